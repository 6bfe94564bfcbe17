"""Visual environments for VLM agents: gymnasium envs played one (image, text) turn at a time.

    env = make_env("frozenlake")  # a built-in | a gymnasium id | "module:EnvId" | "pkg.module:Class"
    turn = env.reset(seed=ENVS["frozenlake"].eval_seeds[0])
    result = env.step("<action>down</action>")  # StepResult: turn, reward, terminated, truncated, ...

Built-ins (`ENVS`): "frozenlake" (random maps), "numberline" (after RL4VLM), "cliffwalking", "sokoban"
(random rooms, generated as gym-sokoban/VAGEN do, with a shortest-solution expert),
"babyai-gotoredballnodists" and "babyai-gotoobj" (minigrid's BabyAI GoTo levels: the mission in the
prompt, the agent's 7x7-cell view as the frame; `vlm_rl.envs.babyai`); each draws flat,
model-friendly frames by default (`render="flat"`) and the env's own on `render="env"`. Any other gymnasium env with discrete actions and a picture to show plays too
(`vlm_rl.envs.external`: MiniGrid/BabyAI ids, a user's `gymnasium.Env` class). Rendering is headless: SDL (pygame-ce, which gymnasium's toy-text frames use) is
pointed at its dummy video and audio drivers unless the environment says otherwise.
"""

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # before anything imports pygame
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

from vlm_rl.envs.adapter import ActionParser, StepResult, Turn, TurnEnv, words_of  # noqa: E402
from vlm_rl.envs.registry import ENVS, EnvSpec, make_env, vocabulary  # noqa: E402

__all__ = [
    "ENVS",
    "ActionParser",
    "EnvSpec",
    "StepResult",
    "Turn",
    "TurnEnv",
    "make_env",
    "vocabulary",
    "words_of",
]
