"""Every command's options, one module per command (:mod:`~maelab.commands.options.pretrain`, ...), and
the sections several commands share (:mod:`~maelab.commands.options.sections`).

Nothing here imports torch, timm or torchvision: the CLI builds a command's flags (and its ``--help``)
from these modules alone. The choices a flag offers come from :mod:`maelab.choices`; checks that need a
model or a file are the commands' own.
"""
