"""DeepSpeed glue: the only part of dpldm that imports torch.distributed or deepspeed.

    env.py     which launcher started us (deepspeed / torchrun / srun / none) -> rank, world
    dist.py    init_distributed() -> DistContext: collectives, the DP engine's World, replica checks
    zero.py    build_model(): ZeRO-3 partitions the frozen model, the trainable part stays replicated
    step.py    run_logical_step(): global chunks dealt to ranks, equal pass counts, noise once, all-reduce
    plan.py    the resolved plan printed by `launch/train.py --dry-run`
The training loop itself is dpldm.train.dp_finetune (one trainer for one process and many ranks).
torch.distributed and deepspeed are imported lazily, so `import dpldm.parallel` stays cheap.
"""
from dpldm.parallel.dist import DistContext, ReplicaMismatchError, init_distributed, single_process_context
from dpldm.parallel.env import LaunchEnv, LaunchError, resolve_launch_env

__all__ = ["DistContext", "ReplicaMismatchError", "init_distributed", "single_process_context", "LaunchEnv",
           "LaunchError", "resolve_launch_env"]
