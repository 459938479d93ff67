"""mmflow: attention knockout and logit lens for LLaVA-style models.

Modules, from the leaves up (each imports only from modules above it):

=========  ===========================================================================================
paper      the paper's vocabulary: tasks, flows, prompt template, window rule (no torch)
errors     :class:`MmflowError`
models     the model-family table, loading, where layers / final norm / feature packing live
patches    box masks through the processor's geometry: related / other image patches
data       :class:`Example`, the shapes world and the paper's GQA CSVs
inputs     prompt and token groups of an example
engines    the knockout primitive (block masks merged into the model's mask) and the engine registry
knockout   :func:`knockout_sweep`, one generic function for every flow
lens       the logit lens
runs       correctness filter, content-keyed results cache, shards, :class:`Run`
figures    curve tables, plots, figure files
findings   the paper's claims against computed verdicts
widgets    the knockout explorer
study      :class:`Study`, what every notebook shares
=========  ===========================================================================================

Notebooks import the facade ``mmflow_utils``; tests of internals import the submodules.
"""
