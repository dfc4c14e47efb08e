"""The training engine shared by pretrain, SFT and DPO (DeepSpeed), its checkpoints and launchers."""

from kubellm.training.buildenv import prefer_interpreter_build_tools

# Before anything imports DeepSpeed's op builders: JIT builds must use the environment's ninja.
prefer_interpreter_build_tools()
