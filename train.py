"""Train a medmm model with DeepSpeed.

    python train.py --config configs/demo.yaml trainer.max_steps=20
    torchrun --nproc_per_node 2 train.py --config configs/demo.yaml
    deepspeed --hostfile hostfile train.py --config configs/demo.yaml
"""

from medmm.training.__main__ import main

if __name__ == "__main__":
    main()
