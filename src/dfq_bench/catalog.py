"""Where every registered name lives. Importing this module fills the registries; methods and
heavy model factories are imported lazily, on first use."""

from dfq_bench import (  # noqa: F401  (register datasets and the model zoo)
    data,
    models,
)
from dfq_bench.calib import sources  # noqa: F401  (registers the calibration sources)
from dfq_bench.registry import METHODS

METHOD_MODULES = {
    "adadfq": "dfq_bench.methods.adadfq:AdaDFQ",
    "dfq": "dfq_bench.methods.dfq:DFQ",
    "dummy": "dfq_bench.methods.dummy:Dummy",
    "gdfq": "dfq_bench.methods.gdfq:GDFQ",
    "genie": "dfq_bench.methods.genie:Genie",
    "granq": "dfq_bench.methods.granq:GranQ",
    "powerquant": "dfq_bench.methods.powerquant:PowerQuant",
    "qimera": "dfq_bench.methods.qimera:Qimera",
    "rex": "dfq_bench.methods.rex:Rex",
    "rtn": "dfq_bench.methods.rtn:RTN",
    "squant": "dfq_bench.methods.squant:Squant",
    "zeroq": "dfq_bench.methods.zeroq:ZeroQ",
}
for _name, _target in METHOD_MODULES.items():
    METHODS.register_lazy(_name, _target)
