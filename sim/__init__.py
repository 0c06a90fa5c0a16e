"""sim: the fleet engine: configs, the Ray-backed scheduler, the virtual clock, results.

Lives here: config parsing, the Grid that runs unmodified Flower apps, the CLI, reports.
Must not: hold model numerics or device physics (those live in clients/ and devices/).
"""

from sim.config import ExperimentConfig, load_config
from sim.engine import FleetGrid
from sim.runner import RunResult, run_experiment, run_simulation

__all__ = [
    "ExperimentConfig",
    "FleetGrid",
    "RunResult",
    "load_config",
    "run_experiment",
    "run_simulation",
]
