"""Generate docs/api.md from fxexpand's docstrings and signatures.

    python docs/gen_api.py          # rewrite docs/api.md
    python docs/gen_api.py --check  # exit 1 if docs/api.md is out of date (the tests run this)
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import fxexpand
import fxexpand.core
import fxexpand.demo.data
import fxexpand.exits
import fxexpand.passes
import fxexpand.pipelines
import fxexpand.testing
import fxexpand.training
import fxexpand.training.protocols

SECTIONS = [
    ("Entry points", fxexpand, ["trace", "compile", "set_train_mode", "train_forms", "contract", "verify", "export_onnx", "benchmark_onnx",
                                "compare_onnx", "save", "load", "build_model", "register_factory",
                                "expansion_report", "count_parameters", "count_flops"]),
    ("Schedules", fxexpand, ["LinearDecay", "set_decay", "get_decay", "linearize"]),
    ("Training (fxexpand.training)", fxexpand.training, ["DecaySchedule", "Trainer", "sync_buffers", "unwrap", "lightning_callback",
                                  "netaug_lightning_callback"]),
    ("The papers' training protocols (fxexpand.training.protocols)", fxexpand.training.protocols, [
        "Phase", "Protocol", "run", "step_flops", "vanilla", "netbooster", "expandnets", "expandnets_init", "netaug"]),
    ("Offline datasets (fxexpand.demo.data)", fxexpand.demo.data, ["Splits", "mnist1d", "digits", "load"]),
    ("BoostNet early exits (fxexpand.exits)", fxexpand.exits, [
        "loss", "segments", "exit_costs", "collect", "anytime", "fit", "evaluate", "budget_curve", "Policy",
        "export", "Runner", "exit_record"]),
    ("NetAug", fxexpand, ["WidthSampler", "set_width", "use_width", "netaug_loss", "sort_channels",
                          "width_record"]),
    ("Pass infrastructure", fxexpand, ["Pass", "PassResult", "PassManager", "Note", "register_pass",
                                       "registered_passes", "get_pass", "build_pass"]),
    ("Engine names for pass authors (fxexpand.core)", fxexpand.core, [
        "ScopedPass", "required_arguments", "LinearOp", "linear_op_of", "bn_of", "shared_use", "value_users",
        "is_metadata_read", "move_metadata_reads", "scale_of", "scale_as_op", "bias_sink",
        "replace_nodes_with_module", "propagate_shapes", "shapes_known", "require_shapes",
        "specialised_defaults", "as_inputs", "select_targets", "residual_branch_nodes", "output_layers", "compose", "sum_parallel",
        "bn_as_op", "analyse", "resize"]),
    ("Typed records (fxexpand.core)", fxexpand.core, [
        "set_record", "get_record", "ModuleRenames", "ParameterOrigins", "Recipe", "GrowthRecord", "ChainRecord",
        "ModelFactory", "WidthRecord", "WidthGroup", "ExitRecord"]),
    ("Width-dynamic layers (fxexpand.core)", fxexpand.core, [
        "DynamicLayer", "DynamicConv", "DynamicLinear", "DynamicBatchNorm", "DynamicLayerNorm"]),
    ("Pipelines", fxexpand.pipelines, ["contraction", "depth_growth", "width_growth"]),
    ("Passes", fxexpand.passes, ["InsertInvertedResidual", "LinearExpand", "DecayActivations", "AugmentWidth",
                                 "ExtractBase", "InsertEarlyExits", "RemoveExits",
                                 "RemoveIdentity", "FoldBatchNorm", "FuseLinear",
                                 "RestoreOriginal", "Verify"]),
    ("Network Expansion (growth)", fxexpand, ["GrowthPlan", "Stage", "EMA", "find_chains", "rebuild_optimizer"]),
    ("Growth passes", fxexpand.passes, ["InsertEMABlocks", "GrowWidth"]),
    ("Modules and reports", fxexpand, ["ExpandedRegion", "DecayActivation", "ContractReport", "VerifyReport",
                                       "LatencyStats"]),
    ("Recipes", fxexpand.recipes, ["netbooster", "expandnets", "netaug", "early_exits"]),
    ("Testing (import fxexpand.testing)", fxexpand.testing, ["random_model", "models", "seeds", "RandomCase",
                                                          "check_expansion", "check_deploy", "check_pass",
                                                          "check_verify_each", "CheckResult", "BreakOutput",
                                                          "randomize_bn", "rel_error", "snapshot", "assert_unchanged",
                                                          "graph_signature", "assert_graph_matches"]),
    ("Errors", fxexpand, ["FxExpandError", "TraceError", "PassError", "PreconditionError", "PostconditionError",
                          "EquivalenceError", "ContractionError", "ExportError", "LoadError", "InputError",
                          "ShapePropagationError"]),
]


def _sig(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", sig)  # no memory addresses: the output must be stable


def render() -> str:
    out = ["# API reference", "",
           "Generated from the docstrings by `python docs/gen_api.py`; `tests/test_docs.py` checks it is current.", ""]
    for title, mod, names in SECTIONS:
        out += [f"## {title}", ""]
        for name in names:
            obj = getattr(mod, name)
            kind = "class" if inspect.isclass(obj) else "function"
            out += [f"### `{mod.__name__}.{name}`", "", f"```text\n{kind} {name}{_sig(obj)}\n```", ""]
            doc = inspect.getdoc(obj) or "(no docstring)"
            out += [doc, ""]
            if registered := getattr(obj, "registered_name", ""):
                out += [f"Registered name: `{registered}`.", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    path = Path(__file__).with_name("api.md")
    text = render()
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            print("docs/api.md is out of date: run python docs/gen_api.py")
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
