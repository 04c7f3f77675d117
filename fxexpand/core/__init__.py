"""The engine: everything a pass needs, and nothing that knows about a particular rewrite.

``fxexpand.core`` never imports :mod:`fxexpand.passes`, :mod:`fxexpand.pipelines`, :mod:`fxexpand.api`
or an application module (import-linter checks this in CI). Passes import only the names listed
here. Modules:

* :mod:`~fxexpand.core.errors` — typed errors;
* :mod:`~fxexpand.core.trace` — tracing with clear errors;
* :mod:`~fxexpand.core.infra` — :class:`Pass`, :class:`PassResult`, :class:`PassManager`, registry;
* :mod:`~fxexpand.core.fx` — graph edits, use counts, shapes, example inputs;
* :mod:`~fxexpand.core.ops` — op tables and readers for both graph forms (rule 8), rule-7 guard;
* :mod:`~fxexpand.core.algebra` — exact composition of convs and linears (rules 1–4);
* :mod:`~fxexpand.core.channels` — channel groups (networkx) and consistent resizing;
* :mod:`~fxexpand.core.select` — choosing expansion targets;
* :mod:`~fxexpand.core.modules` — modules fxexpand inserts (DecayActivation, Residual);
* :mod:`~fxexpand.core.dynamic` — width-dynamic layers (NetAug's weight-shared supernet);
* :mod:`~fxexpand.core.provenance` — expanded regions and typed records;
* :mod:`~fxexpand.core.verify` — numerical equivalence.
"""

from .algebra import (
    bn_as_op,
    compose,
    dense_weight,
    grouped_weight,
    identity_like,
    max_groups,
    negate,
    scale_as_op,
    sum_parallel,
)
from .channels import ChannelAnalysis, analyse, orthogonal_rows, resize
from .dynamic import (
    DYNAMIC_SOURCES,
    DynamicBatchNorm,
    DynamicConv,
    DynamicLayer,
    DynamicLayerNorm,
    DynamicLinear,
    Segment,
)
from .errors import (
    ContractionError,
    EquivalenceError,
    ExportError,
    FxExpandError,
    InputError,
    LoadError,
    NothingExpandedError,
    PassError,
    PostconditionError,
    PreconditionError,
    ShapePropagationError,
    SparseExpansionWarning,
    TraceError,
)
from .fx import (
    as_inputs,
    attr_use_counts,
    delete_unused_submodules,
    erase_if_dead,
    fresh_name,
    get_attr,
    get_module,
    has_module,
    in_scope,
    is_metadata_read,
    metadata_reads,
    module_call_count,
    module_call_counts,
    move_metadata_reads,
    node_input,
    node_label,
    out_shape,
    propagate_shapes,
    replace_nodes_with_module,
    replace_tensor,
    require_shapes,
    set_module,
    shallow_copy_module,
    shapes_known,
    unwrap,
    value_users,
)
from .infra import (
    Note,
    Pass,
    PassManager,
    PassResult,
    ScopedPass,
    build_pass,
    get_pass,
    register_pass,
    registered_passes,
    required_arguments,
    unregister_pass,
)
from .modules import DecayActivation, GradientScale, Residual
from .ops import (
    ADD_FUNCS,
    BN_FUNCS,
    BN_MODULES,
    BN_TYPES,
    CONV_FUNCS,
    CONV_MODULES,
    CONV_TYPES,
    LINEAR_FUNCS,
    BNParams,
    LinearOp,
    as_int_tuple,
    bias_sink,
    bn_of,
    constant_of,
    is_add,
    is_sub,
    linear_op_of,
    linear_param_names,
    node_arg,
    norm_padding,
    scale_of,
    shared_use,
    site_name,
)
from .provenance import (
    RESTORABLE_TYPES,
    ChainRecord,
    ExitRecord,
    ExpandedRegion,
    GrowthRecord,
    ModelFactory,
    ModuleRenames,
    ParameterOrigins,
    Recipe,
    WidthGroup,
    WidthRecord,
    build_layer,
    drop_record,
    find_regions,
    get_record,
    keep_attr,
    layer_config,
    persistent_records,
    region_of,
    set_record,
    set_traced_regions,
    traced_regions,
)
from .select import (
    ACTIVATION_FUNCS,
    ACTIVATION_MODULES,
    BLOCK_TYPES,
    activation_near,
    block_of,
    conv_problem,
    evenly_spaced,
    output_layers,
    pooled_input,
    residual_branch_nodes,
    select_targets,
    spread,
)
from .trace import ModuleCall, specialised_defaults, trace, trace_with_calls
from .verify import (
    OutputError,
    VerifyReport,
    flatten_outputs,
    nonfinite_tensors,
    to_float64,
    verify,
)

__all__ = [
    # algebra
    "bn_as_op", "compose", "dense_weight", "grouped_weight", "identity_like", "max_groups", "negate", "scale_as_op",
    "sum_parallel",
    # channels
    "ChannelAnalysis", "analyse", "orthogonal_rows", "resize",
    # dynamic
    "DYNAMIC_SOURCES", "DynamicBatchNorm", "DynamicConv", "DynamicLayer", "DynamicLayerNorm", "DynamicLinear",
    "Segment",
    # errors
    "ContractionError", "EquivalenceError", "ExportError", "FxExpandError", "InputError", "LoadError",
    "NothingExpandedError", "PassError", "PostconditionError", "PreconditionError", "ShapePropagationError",
    "SparseExpansionWarning", "TraceError",
    # fx
    "as_inputs", "attr_use_counts", "delete_unused_submodules", "erase_if_dead", "fresh_name", "get_attr", "get_module", "has_module",
    "in_scope", "is_metadata_read", "metadata_reads", "module_call_count", "module_call_counts",
    "move_metadata_reads", "node_input", "node_label", "out_shape", "propagate_shapes",
    "replace_nodes_with_module", "replace_tensor", "require_shapes", "set_module", "shallow_copy_module",
    "shapes_known", "unwrap", "value_users",
    # infra
    "Note", "Pass", "PassManager", "PassResult", "ScopedPass", "build_pass", "get_pass", "register_pass",
    "registered_passes", "required_arguments", "unregister_pass",
    # modules
    "DecayActivation", "GradientScale", "Residual",
    # ops
    "ADD_FUNCS", "BN_FUNCS", "BN_MODULES", "BN_TYPES", "CONV_FUNCS", "CONV_MODULES", "CONV_TYPES", "LINEAR_FUNCS",
    "BNParams", "LinearOp", "as_int_tuple", "bias_sink", "bn_of", "constant_of", "is_add", "is_sub", "linear_op_of", "linear_param_names", "node_arg",
    "norm_padding", "scale_of", "shared_use", "site_name",
    # provenance
    "RESTORABLE_TYPES", "ChainRecord", "ExpandedRegion", "GrowthRecord", "ModelFactory", "ModuleRenames", "ParameterOrigins",
    "Recipe", "WidthGroup", "WidthRecord", "ExitRecord", "build_layer", "drop_record", "find_regions", "get_record", "keep_attr", "layer_config", "persistent_records", "region_of", "set_record",
    "set_traced_regions", "traced_regions",
    # select
    "ACTIVATION_FUNCS", "ACTIVATION_MODULES", "BLOCK_TYPES", "activation_near", "block_of", "conv_problem", "evenly_spaced", "select_targets",
    "residual_branch_nodes", "output_layers", "pooled_input",
    "spread",
    # trace
    "ModuleCall", "specialised_defaults", "trace", "trace_with_calls",
    # verify
    "OutputError", "VerifyReport", "flatten_outputs", "nonfinite_tensors", "to_float64", "verify",
]
