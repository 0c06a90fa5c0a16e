"""sim: the fleet engine: configs, the Ray-backed scheduler, the virtual clock, results.

Lives here: config parsing, the Grid that runs unmodified Flower apps, the CLI, reports.
Must not: hold model numerics or device physics (those live in clients/ and devices/).
"""
