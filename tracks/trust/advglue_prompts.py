"""Prompt functions the AdvGLUE task YAMLs beside this file name with `!function`.

lm-eval resolves `!function advglue_prompts.<name>` relative to the YAML's folder, so the
stock GLUE prompt functions are re-exported here rather than copied: MNLI's prompt is
lm-eval's own `glue/mnli/utils.doc_to_text` ("<premise>\\nQuestion: <hypothesis>. True,
False or Neither?\\nAnswer:").
"""

from lm_eval.tasks.glue.mnli.utils import doc_to_text as mnli_doc_to_text

__all__ = ["mnli_doc_to_text"]
