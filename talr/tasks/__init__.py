"""Domain tasks. Each is one module with a `Task` subclass; YAML selects it by class path, e.g.

    data:
      task:
        class_path: talr.tasks.MedCalc
        init_args: {source: synthetic, format: cot}
"""

from talr.tasks.base import DataError, Task, split_by_group

__all__ = ["DataError", "Task", "split_by_group", "MedCalc", "ESCI"]


def __getattr__(name):  # lazy, so importing one task never imports the others
    if name == "MedCalc":
        from talr.tasks.medcalc import MedCalc

        return MedCalc
    if name == "ESCI":
        from talr.tasks.esci import ESCI

        return ESCI
    raise AttributeError(name)
