"""mmflow_utils: the names the notebooks use, re-exported from the :mod:`mmflow` package.

A five-line tour::

    import mmflow_utils as mu
    model, processor = mu.load_model("shapes-llava")              # or "llava-hf/llava-1.5-7b-hf", or a folder
    example = mu.load_examples("shapes", n=1, tasks=["ChooseRel"])[0]
    enc = mu.encode_example(processor, example, model=model)      # inputs + token groups (image, question, last, ...)
    rows = mu.knockout_sweep(model, enc, ["Question->Last", "Image->Question"])  # window: the paper's rule

The one-off knockout is two lines: ``with mu.knockout_attention(model): model(**enc.inputs,
knockout=mu.Knockout({layer: mu.block_mask([(targets, sources)], enc.length, enc.length)}))``.
Where each name lives: see the module map in :mod:`mmflow`.
"""

from mmflow import across, findings
from mmflow.cache import merge_cached, shard_of
from mmflow.data import DEFAULT_SHAPES_PER_TASK, EMBEDDED_DATA, Example, load_examples, load_gqa, load_shapes
from mmflow.engines import ENGINES, BlockMask, Knockout, block_mask, knockout_attention
from mmflow.errors import MmflowError
from mmflow.fast import Clean, clean_run
from mmflow.figures import (
    COLORS,
    FIG_CASING,
    FIG_CASING_PER_TASK,
    FIG_IMAGE_TO_QUESTION,
    FIG_OVERVIEW,
    FIG_PATCH_EXAMPLE,
    FIG_PATCH_GROUPS,
    FIG_TO_LAST,
    NOTEBOOK_FIGURES,
    YLABEL_CHANGE,
    check_provenance,
    curve_table,
    describe_curves,
    largest_drop,
    mean_over_tasks,
    overview_curves,
    plot_curves,
    plot_overview,
    plot_patch_overlay,
    read_manifest,
    record_provenance,
    save_figure,
    stable_table,
)
from mmflow.findings import Verdict, verdict_markdown, verdict_table
from mmflow.inputs import Encoded, build_prompt, encode, encode_example
from mmflow.knockout import flow_positions, knockout_sweep
from mmflow.lens import (
    ANSWER,
    CAPITALIZED,
    FALSE_OPTION,
    LENS_VIEWS,
    LOWERCASE,
    PAPER_VIEW,
    RAW,
    WITH_NORM,
    answer_token_ids,
    capture_layer_outputs,
    logit_lens,
    token_label,
)
from mmflow.models import EMBEDDED_MODEL, EMBEDDED_MODELS, decoder_layers, layer_mlp, load_model, num_layers, text_model
from mmflow.paper import (
    FLOWS,
    IMAGE_TO_QUESTION,
    INSTRUCTION,
    PAPER_WINDOW,
    PATCH_FLOWS,
    TASKS,
    TO_LAST_FLOWS,
    default_window,
    window_layers,
)
from mmflow.patches import NEITHER, OTHER, RELATED, image_token_labels, patch_groups
from mmflow.runs import KEEP, Run, greedy_answer
from mmflow.study import ANALYSES, Study
from mmflow.styles import STYLES, line_style
from mmflow.tables import accuracy_table, example_table, wrong_answers
from mmflow.widgets import KnockoutExplorer, LensExplorer, ModelSwitchExplorer

# fmt: off
__all__ = [
    # the paper's vocabulary
    "TASKS", "FLOWS", "TO_LAST_FLOWS", "IMAGE_TO_QUESTION", "PATCH_FLOWS", "INSTRUCTION", "PAPER_WINDOW",
    "default_window", "window_layers",
    # models and data
    "MmflowError", "EMBEDDED_MODEL", "EMBEDDED_MODELS", "load_model", "num_layers", "decoder_layers", "layer_mlp",
    "text_model",
    "EMBEDDED_DATA", "DEFAULT_SHAPES_PER_TASK", "Example", "load_examples", "load_gqa", "load_shapes",
    # inputs and patch groups
    "Encoded", "build_prompt", "encode", "encode_example", "RELATED", "OTHER", "NEITHER", "image_token_labels",
    "patch_groups",
    # knockout and logit lens
    "BlockMask", "block_mask", "Knockout", "knockout_attention", "Clean", "clean_run", "ENGINES", "flow_positions",
    "knockout_sweep", "logit_lens", "capture_layer_outputs", "answer_token_ids", "token_label", "ANSWER",
    "FALSE_OPTION", "LOWERCASE", "CAPITALIZED", "LENS_VIEWS", "WITH_NORM", "RAW", "PAPER_VIEW",
    # runs over many examples
    "Run", "KEEP", "accuracy_table", "example_table", "wrong_answers", "greedy_answer", "merge_cached", "shard_of",
    # figures, findings, notebooks
    "FIG_TO_LAST", "FIG_IMAGE_TO_QUESTION", "FIG_PATCH_GROUPS", "FIG_PATCH_EXAMPLE", "FIG_CASING",
    "FIG_CASING_PER_TASK", "FIG_OVERVIEW", "NOTEBOOK_FIGURES", "COLORS", "curve_table", "plot_curves", "save_figure",
    "largest_drop", "mean_over_tasks", "describe_curves", "plot_patch_overlay", "record_provenance", "read_manifest",
    "check_provenance", "findings", "Verdict", "plot_overview", "overview_curves", "STYLES", "line_style",
    "verdict_table", "verdict_markdown", "Study", "ANALYSES", "KnockoutExplorer", "LensExplorer",
    "ModelSwitchExplorer", "across", "stable_table", "YLABEL_CHANGE",
]
# fmt: on
