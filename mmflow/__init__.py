"""mmflow: attention knockout and logit lens for multimodal LLMs (LLaVA and the families of docs/model-families.md).

Modules, from the leaves up (each imports only from modules above it):

===========  ===========================================================================================
paper        the paper's vocabulary: tasks, flows, prompt template, window rule (no torch)
errors       :class:`MmflowError`
images       image files to RGB (one conversion for runs and check-data), the image folder, boxes against the image
checkpoints  checkpoint folders checked before any weight loads; hub ids found in the local cache first
families     the model-family table (which families, recognised by structure: docs/model-families.md), processors
models       strict loading, where layers / rotary (and M-RoPE positions) / final norm / feature packing live
identity     a model's identity: the SHA-256 of every file of its checkpoint (cache keys, figure provenance)
patches      box masks through the processor's geometry: related / other image patches
data         :class:`Example`, the shapes world and the paper's GQA CSVs
words        options in their "X or Y" slot and object words in a question, with the rule that found them
inputs       the prompt ("paper" or "processor" inputs) and the token groups of an example
cache        the results cache: content-keyed files checked on read, atomic writes, shards, progress
budget       the fast engine's tokens per pass: from the device's free memory, or as the user sets it
fast         the fast engine: the clean run reused in positions and layers, flows and windows as suffix copies
engines      the knockout primitive (block masks merged into the model's mask) and the engine registry
knockout     :func:`knockout_sweep`, one generic function for every flow
lens         the logit lens
runs         correctness filter and :class:`Run` (analyses many examples through the cache)
tables       per-task accounting of every example (analysed, not encodable, skipped flows)
styles       one look (colour, dash, marker) per flow and lens token; integer layer axes
figures      curve tables with bootstrap bands, the figures (analyses and overview), figure files, provenance
findings     the paper's claims against computed verdicts, with n and the band (or "inconclusive")
widgets      the knockout and logit-lens explorers
study        :class:`Study`, what every notebook shares
===========  ===========================================================================================

Commands behind ``make``: ``execute`` (``make reproduce``, one notebook), ``warm`` (``make reproduce``: notebook 6's
other models, computed beside notebooks 1-4), ``sweep`` (``make sweep``, Accelerate),
``lab`` (``make lab``), ``report`` (``make report``), ``check_data`` (``make check-data``), ``families_check``
(``make families``: every family live on its tiny replica from the ``replicas`` package);
``params`` checks the parameters of ``make reproduce`` and ``make sweep`` before anything is written.

Notebooks import the facade ``mmflow_utils``; tests of internals import the submodules.
"""
