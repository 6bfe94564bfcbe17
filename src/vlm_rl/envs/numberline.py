"""NumberLine (after RL4VLM's gym_cards NumberLine): move the current number to the target number.

Protocol:
- instruction: `INSTRUCTION` ("number line . make the current number equal to the target number .
  action : + or - ?"); the image shows both numbers;
- actions: "+" (add one) and "-" (subtract one), clipped to [0, max_number]; aliases "up", "plus",
  "increase", "down", "minus", "decrease"; a reply with neither steps nothing and costs
  `invalid_penalty`;
- reward: 1.0 on reaching the target, else 0.0;
- termination: current == target; truncation after `max_turns` (default max_number + 2);
- success: current == target.

A seed draws target and start (different numbers in [0, max_number]); with the default 8 there are
only 72 such pairs, so held-out seeds test the same pairs as training ones (NumberLine measures
reading the image, not generalising to new states).

`render="flat"` (the default) draws each number as a bar whose length is the number: horizontal
bands alternate target (green, on top) and current (red), 4 bands of each, so at 32x32 every 8x8
patch holds one target band above one current band and the bar that is longer shows within single
patches. `render="env"` is the env's own frame, RL4VLM's style: "target 5" / "current 3" in digits,
resized to `image_size`.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium
import numpy as np
from PIL import Image, ImageDraw

from vlm_rl.envs.adapter import ActionParser, TurnEnv

INSTRUCTION = "number line . make the current number equal to the target number . action : + or - ?"
ACTIONS = ["+", "-"]
ALIASES = {"up": "+", "plus": "+", "increase": "+", "down": "-", "minus": "-", "decrease": "-"}
TRAIN_SEEDS = range(0, 10_000)
EVAL_SEEDS = range(100_000, 100_200)
TARGET_COLOR, CURRENT_COLOR = (0, 255, 0), (255, 0, 0)


class NumberLineEnv(gymnasium.Env):
    """A target and a current number in [0, max_number]; action 0 adds one, action 1 subtracts one.

    The observation is the image (`style`: "digits" or "bars", image_size x image_size RGB); `target`
    and `current` hold the state.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        max_number: int = 8,
        style: Literal["digits", "bars"] = "digits",
        image_size: int = 64,
        render_mode: str | None = "rgb_array",
    ) -> None:
        if max_number < 1:
            raise ValueError(f"max_number must be at least 1, not {max_number}")
        if style not in ("digits", "bars"):
            raise ValueError(f"style must be 'digits' or 'bars', not {style!r}")
        self.max_number, self.style, self.image_size, self.render_mode = (
            max_number,
            style,
            image_size,
            render_mode,
        )
        self.observation_space = gymnasium.spaces.Box(0, 255, (image_size, image_size, 3), dtype=np.uint8)
        self.action_space = gymnasium.spaces.Discrete(2)
        self.target, self.current = 1, 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.target, self.current = (
            int(n) for n in self.np_random.choice(self.max_number + 1, size=2, replace=False)
        )
        return self.render(), {}

    def step(self, action: int):
        self.current = min(max(self.current + (1 if action == 0 else -1), 0), self.max_number)
        reached = self.current == self.target
        return self.render(), float(reached), reached, False, {}

    def render(self) -> np.ndarray:
        draw = draw_bars if self.style == "bars" else draw_digits
        return np.asarray(draw(self.target, self.current, self.max_number, self.image_size))


def draw_bars(target: int, current: int, max_number: int, size: int) -> Image.Image:
    """Bands alternating target (green) and current (red) bars, each as long as its number."""
    image = Image.new("RGB", (size, size))
    edges = [round(k * size / 8) for k in range(9)]
    for band in range(8):
        number, color = (target, TARGET_COLOR) if band % 2 == 0 else (current, CURRENT_COLOR)
        width = round(number * size / max_number)
        if width:
            image.paste(color, (0, edges[band], width, edges[band + 1]))
    return image


def draw_digits(target: int, current: int, max_number: int, size: int) -> Image.Image:
    """Black text on white: "target <n>" above "current <n>" (PIL's default font)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((2, size // 4 - 6), f"target {target}", fill=(0, 0, 0))
    draw.text((2, 3 * size // 4 - 6), f"current {current}", fill=(0, 0, 0))
    return image


def expert(env: TurnEnv) -> str:
    """The optimal move: "+" below the target, "-" above it."""
    line = env.env.unwrapped
    return "+" if line.current < line.target else "-"


def solved(env: NumberLineEnv) -> bool:
    return env.current == env.target


def make_numberline(
    *,
    max_number: int = 8,
    render: Literal["flat", "env"] = "flat",
    image_size: int | None = 32,
    max_turns: int | None = None,
    **adapter_options: Any,
) -> TurnEnv:
    """NumberLine turns on [0, `max_number`]; `adapter_options` go to `TurnEnv`."""
    if render not in ("flat", "env"):
        raise ValueError(f"render must be 'flat' or 'env', not {render!r}")
    style = "bars" if render == "flat" else "digits"
    frame_size = image_size or 64
    return TurnEnv(
        NumberLineEnv(max_number, style=style, image_size=frame_size if style == "bars" else 64),
        actions=ACTIONS,
        instruction=INSTRUCTION,
        image_size=image_size,
        success=solved,
        parser=ActionParser(ACTIONS, aliases=ALIASES),
        max_turns=max_turns if max_turns is not None else max_number + 2,
        **adapter_options,
    )
