"""Train a GPT: ``python train.py [experiment=NAME] [key=value ...]``.

Configuration lives in ``configs/`` (Hydra); the work is done by ``training.train.train``.
"""

import hydra
from omegaconf import DictConfig

from training.train import main_env_defaults, train


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main_env_defaults()
    main()
