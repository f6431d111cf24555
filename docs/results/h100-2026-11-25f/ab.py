"""A/B in one process: plain, then magicdec with the new rounds step (long steps, rows regrouped on the device) and
with the old one (steps of 8 replays, no regrouping), interleaved; warm-up once per kind."""
import json, random, statistics, sys, time
sys.path.insert(0, '.')
import decodekit
from decodekit.bench.together import decode_together
from decodekit.engine.graphs import GraphRunner
from decodekit.eval.long_context import Haystack, data_dir, make_sample, vocabulary
from decodekit.sampling import SamplingConfig

length, batch, new, kv, dd, order = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6].split(',')
OLD = [False]
inner_rounds, inner_within = GraphRunner.draft_rounds, GraphRunner.replays_within
def rounds(self, *a, live=None, **k):
    return inner_rounds(self, *a, live=None if OLD[0] else live, **k)
def within(self, longest, per, replays):
    return replays if OLD[0] else inner_within(self, longest, per, replays)
GraphRunner.draft_rounds, GraphRunner.replays_within = rounds, within
engine = decodekit.load('gemma3-270m', device=None if len(sys.argv) < 8 else sys.argv[7], progress=False, prefix_caching=False, kv_tokens=kv)
hay = Haystack.load(engine.tokenizer, data_dir(dd))
L = min(length, engine.max_context - new - 8)
depths = [0.5] if batch == 1 else [i / (batch - 1) for i in range(batch)]
prompts = [make_sample("niah", hay, engine.tokenizer, L, d, random.Random(i), vocabulary(hay)).prompt for i, d in enumerate(depths)]
greedy = SamplingConfig(temperature=0.0)
kws = {'plain': {}, 'new': dict(method='magicdec', adaptive=False, method_options={'num_draft': 7}),
       'old': dict(method='magicdec', adaptive=False, method_options={'num_draft': 7})}
seen, res, plain_ids = set(), {}, None
for name in order:
    OLD[0] = name == 'old'
    if name not in seen:
        seen.add(name)
        decode_together(engine, prompts, new, sampling=greedy, ignore_eos=True, **kws[name])
    r = decode_together(engine, prompts, new, sampling=greedy, ignore_eos=True, **kws[name])
    ids = [x.token_ids for x in r.results]
    if name == 'plain':
        plain_ids = ids
    same = sum(a == b for a, b in zip(ids, plain_ids)) if plain_ids else None
    res.setdefault(name, []).append(r.decode_tok_s)
    print(json.dumps({'config': name, 'decode_tok_s': r.decode_tok_s, 'decode_s': r.decode_s, 'identical_to_plain': same, 'passes': sum(x.stats.forward_passes for x in r.results)}), flush=True)
base = statistics.median(res['plain'])
for k, v in res.items():
    print(k, [round(x, 1) for x in v], 'median', round(statistics.median(v), 1), 'x', round(statistics.median(v) / base, 3))
