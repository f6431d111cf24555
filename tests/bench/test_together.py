"""decodekit.bench.together: every prompt is prefilled before any sequence decodes past its first token, the B
sequences then decode together, and the tokens are generate's."""
import torch

import decodekit
from decodekit.bench.together import decode_together
from decodekit.sampling import SamplingConfig


def test_a_batch_decodes_together_and_gives_generates_tokens():
    # Chunks of 64 tokens: the three 150-token prompts take several steps to prefill, one after another.
    engine = decodekit.load("random:tiny-gemma3", device="cpu", progress=False, max_step_tokens=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (150,), generator=g).tolist() for _ in range(3)]
    greedy = SamplingConfig(temperature=0.0)
    seen = []
    got = decode_together(engine, prompts, 12, around_decode=lambda: _Note(engine, seen), sampling=greedy,
                          ignore_eos=True)
    assert seen == [[1, 1, 1]]  # when the decode phase starts, each sequence holds its first token only
    assert got.decoded == 3 * 11 and got.decode_s > 0 and got.prefill_s > 0
    want = engine.generate(prompts, 12, sampling=greedy, ignore_eos=True)
    assert [r.token_ids for r in got.results] == [r.token_ids for r in want]
    assert not engine.core.has_work()


class _Note:
    """Records the output lengths of the engine's running sequences when the decode phase starts."""

    def __init__(self, engine, seen):
        self.engine, self.seen = engine, seen

    def __enter__(self):
        seqs = sorted((s for r in self.engine.core.requests.values() for s in r.sequences), key=lambda s: s.id)
        self.seen.append([len(s.output) for s in seqs])

    def __exit__(self, *exc):
        return False
