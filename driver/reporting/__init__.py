"""Reports a reviewer trusts (issue 9): the store report (markdown + one self-contained HTML
page + `report.json`), compare-with-paper, the fairness check, and the reviewer bundle with
its checker.

    build.py    store -> typed StoreReport (which runs are trusted, what forms a cell, OMs)
    paper.py    compare with paper (matching and tolerances are data: paper_match.toml)
    tables.py   the paper's table layouts as neutral rows; render.py: markdown and HTML
    plots.py    matplotlib figures (paper Figs. 2-4, OM radar)
    bundle.py   `bundle` and `verify`
    browser.py  headless Chromium: screenshots and rendered-DOM checks
    write.py    the report files of a store (report.json, report.md, report.html)
    commands.py the CLI verbs, added to the main app by `register(app)`
"""
