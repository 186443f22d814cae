"""A few timed steps at start-up, so the Conductor's cost model has data before traffic.

Prompts of random tokens are prefilled at a few lengths (alone, so each step is one chunk)
and small batches decoded; each pure step becomes a sample. The prefix cache is emptied
afterwards so none of it is ever reported or hit.
"""

from __future__ import annotations

import random

from kvcake.engine.core import EngineCore
from kvcake.wire.sampling import SamplingParams
from kvcake.worker.loop import Telemetry

PROFILE_PROMPT_LENS = (32, 128, 512)
PROFILE_BATCHES = (1, 4)
_DECODE_STEPS = 4


def profile_engine(core: EngineCore, seed: int = 0) -> Telemetry:
    rng = random.Random(seed)
    low, high = 1000, core.model_config.vocab_size - 1
    telemetry = Telemetry(load=core.load())
    lengths = [n for n in PROFILE_PROMPT_LENS
               if n < min(core.max_model_len, core.config.max_num_batched_tokens)]
    for n in lengths:
        _run(core, telemetry, [[rng.randint(low, high) for _ in range(n)]], 1)
    for batch in PROFILE_BATCHES:
        prompts = [[rng.randint(low, high) for _ in range(64)] for _ in range(batch)]
        _run(core, telemetry, prompts, _DECODE_STEPS + 1)
    core.scheduler.kv.reset_prefix_cache()
    core.drain_kv_events()
    return telemetry


def _run(core: EngineCore, telemetry: Telemetry, prompts: list[list[int]],
         max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(f"profile-{len(prompt)}-{len(prompts)}-{i}", prompt, params)
    while core.has_unfinished():
        core.step()
        if core.last_step is not None:
            telemetry.add_step(core.last_step)
