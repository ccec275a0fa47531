"""One module per `maelab` subcommand. Each has ``NAME``, ``HELP``, ``DESCRIPTION``, ``Config`` (its
config dataclass, whose fields become the flags; ``None`` for commands with hand-written arguments and
an ``add_arguments(parser)``) and ``run(cfg_or_args)``. What they all do around their work is
:mod:`maelab.commands.session`; the config sections several of them share are
:mod:`maelab.commands.sections`; `maelab pretrain`'s options, which the commands that run pre-trainings read, are
:mod:`maelab.commands.pretrain_config`. A command never imports another command.
"""

from maelab.commands import (ablate, convert, detect, features, finetune, knn, linprobe, models, pretrain, recipe,
                             segment, shards, visualize)

COMMANDS = (pretrain, visualize, convert, models, finetune, linprobe, knn, features, ablate, recipe, shards, segment,
            detect)

__all__ = ["COMMANDS"]
