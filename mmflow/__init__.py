"""mmflow: attention knockout and logit lens for LLaVA-style (1.5, NeXT, OneVision), Qwen2/2.5-VL and Gemma 3 models.

Modules, from the leaves up (each imports only from modules above it):

=========  ===========================================================================================
paper      the paper's vocabulary: tasks, flows, prompt template, window rule (no torch)
errors     :class:`MmflowError`
families   the model-family table (LLaVA-1.5 / NeXT / OneVision, Qwen2-VL / 2.5-VL, Gemma 3), processor building
models     loading, where layers / rotary (and M-RoPE positions) / final norm / feature packing live
patches    box masks through the processor's geometry: related / other image patches
data       :class:`Example`, the shapes world and the paper's GQA CSVs
words      options in their "X or Y" slot and object words in a question, with the rule that found them
inputs     the prompt ("paper" or "processor" inputs) and the token groups of an example
cache      the results cache: content-keyed files checked on read, atomic writes, shards, progress
budget     the fast engine's tokens per pass: from the device's free memory, or as the user sets it
fast       the fast engine: the clean run reused in positions and layers, flows and windows as suffix copies
engines    the knockout primitive (block masks merged into the model's mask) and the engine registry
knockout   :func:`knockout_sweep`, one generic function for every flow
lens       the logit lens
runs       correctness filter and :class:`Run` (analyses many examples through the cache)
tables     per-task accounting of every example (analysed, not encodable, skipped flows)
figures    curve tables with bootstrap bands, seaborn plots, figure files, provenance
findings   the paper's claims against computed verdicts
widgets    the knockout and logit-lens explorers
study      :class:`Study`, what every notebook shares
=========  ===========================================================================================

Commands behind ``make``: ``execute`` (``make reproduce``, one notebook), ``sweep`` (``make sweep``, Accelerate),
``lab`` (``make lab``), ``report`` (``make report``), ``check_data`` (``make check-data``).

Notebooks import the facade ``mmflow_utils``; tests of internals import the submodules.
"""
