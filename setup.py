"""Maps the top-level folders (SPEC.md section 4 layout) onto the `llmcbench` package.

driver/ -> llmcbench.driver, methods/ -> llmcbench.methods (each methods/<name>/ a
subpackage, discovered), tracks/ -> llmcbench.tracks. Data files (method.toml, task
YAMLs, the shipped data slices, the paper tables) travel as package data.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"driver": "llmcbench.driver", "methods": "llmcbench.methods", "tracks": "llmcbench.tracks"}

packages, package_dir = [], {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    # namespace discovery: the data folders (tracks/data/hf/..., tracks/paper) are packages to
    # setuptools too, which warns about each one that a plain find_packages leaves out
    subs = find_namespace_packages(folder, exclude=["tests", "tests.*", "*.tests", "*.tests.*", "*__pycache__*"])
    packages += [f"{name}.{sub}" for sub in subs]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "llmcbench.driver": ["*.toml", "reporting/*.toml"],
        "llmcbench.methods": ["*/method.toml"],
        "llmcbench.tracks": ["data/**/*", "paper/*", "*/*.yaml"],
    },
)
