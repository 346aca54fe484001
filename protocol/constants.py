"""Names every peer must agree on, importable without torch (the CLI's ``--help`` reads them).

``PROTOCOL_VERSION`` is what peers compare on connecting; bump it whenever a wire message,
record schema or id derivation changes (tests/test_ids.py pins the digests).
"""

from __future__ import annotations

from typing import Literal, get_args

# 2: blob ids hash a list of piece hashes; 3: BLAKE3, not SHA-256; 4: heads name a momentum
# blob; 5: heads also stand under their author's own key; 6: config fields for robust merging
# and admission; 7: heads name the authors they credit, configs have epochs and handovers,
# provider records carry the peer's binding (protocol.peer_binding); 8: owned topics
# ``<subject>~<author>`` (records.owned_topic) for heads, bases and leases, config records only
# from an aggregator they name, handovers carry the config they follow; 9: a blob's provider
# records spill over records.PROVIDER_SHARDS more keys once its first is crowded
PROTOCOL_VERSION = "9"

# the delta value codecs (protocol.codecs.CODECS implements exactly these)
CodecName = Literal["bf16", "fp16", "fp32", "int4", "int8", "sign"]
CODEC_NAMES: tuple[str, ...] = get_args(CodecName)
# A swarm's default delta: 4-bit values, DARE keeping a fifth of the entries, 0.11 bytes per
# parameter. The best point under 0.15 measured on SmolLM2-135M by scripts/bench_compression.py
# (docs/benchmarks.md): it kept all of the dense swarm's gain (1.001; bf16 at p = 0.9: 0.998
# at 0.146 bytes) and 0.993 of a single fine-tune's.
DEFAULT_CODEC: CodecName = "int4"
DEFAULT_DROP_RATE = 0.8

# every reason an aggregator refuses a delta for: bounded metric labels, and the keys of the
# counts an aggregator's heartbeat carries to monitors
DELTA_REJECT_REASONS = (
    "size",
    "bad_signature",
    "unknown_base",
    "layout",
    "non_finite",
    "malformed",
    "norm",
    "eval_gate",
    "drop_rate",
    "no_gain",
)
