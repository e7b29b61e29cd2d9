"""Train a medmm model: every stage (``trainer.stage`` in the config: sft, align, head, pretrain, ...) runs through
the one DeepSpeed loop.

    python train.py --config configs/demo.yaml trainer.max_steps=20
    torchrun --nproc_per_node 2 train.py --config configs/demo.yaml
    deepspeed --hostfile hostfile train.py --config configs/demo.yaml
    python train.py --config configs/tasks/druggability_head.yaml        # encoder + head, no LLM
    python train.py --config C --resume                                  # continue from the latest checkpoint
"""

from medmm.training.__main__ import main

if __name__ == "__main__":
    main()
