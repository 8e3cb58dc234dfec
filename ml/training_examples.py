"""Training and evaluation examples for the three tasks (paper 3.3, 4.2.1).

Built for day D from the validated logs of the window ending at D, the day's graph snapshot and its cached
neighbourhoods:

- entity-entity pairs (3.3.1) from two sources, each tagged with its source, the engaged pin's segment and
  the source weight w_i of eq. 2:
  * graph pairs: u and a node drawn from u's sampled neighbourhood N(u) (one draw per configured
    (query type, neighbour block) pair, uniform over the block's real neighbours);
  * engagement pairs: pin -> pin from related_pins saves/clicks (query pin -> engaged pin) and board -> pin
    from saves.
- user sequences (3.3.3): each user's time-ordered engaged pins, at most t_max, followed by up to Delta
  future engagements for eq. 5.
- entity-feature nodes (3.3.2): every graph node.
- the day's entity universe (``universe.parquet``): every pin and board of the graph or the metadata; the
  random-negative samplers of training and the evaluator's negative pools draw from it.

Held-out sets (graph_engine.holdout): a stateless hash of the pair / user / node, so they are held out on
every day. Held-out engagement pairs never become graph edges (the edge engine's ``prune_window(...,
holdout=holdout_of(config))`` drops them from the window graph; ``drop_held_out_edges`` is the same filter
on an edge table; the pair hash is unordered so the pin_board edge {pin, board} and the board -> pin
engagement pair are one pair); a held-out graph pair's positive is masked out of the query's
neighbourhood (and the query out of the positive's) when the evaluator embeds them (ml.evaluator,
ml.inference.exclude_neighbors), so no evaluation query is embedded with its own pair's edge. Because the
split hashes the UNORDERED pair, a pair is on the same side whatever its source or direction.

User-entity evaluation uses engagement after a cutoff (paper 4.2.1; here the last ``eval_horizon_days`` of
the window): held-out users only (disjoint in users from the training sequences), history = their last
t_max engagements before the cutoff, positives = their first Delta engagements after it. No leak
through time or the graph: training sequences end at the cutoff, and held-out users' engagement never
becomes a graph edge (``daily_edges`` drops their events: ``Holdout.user_sql_stages``), so no pin that embeds
a history holds the same user's future saves in its neighbourhood; nor a training pair (``pair_logs_view``
drops their events at or after the cutoff before the engagement pairs are counted; the test pairs still count
every event).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graph_engine.batch import NODE_TYPE_CODE
from graph_engine.holdout import (
    DEFAULT_EVAL_FRACTION,
    DEFAULT_HOLDOUT_SEED,
    TYPE_CODE,
    Holdout,
    held_out_entities,
    held_out_pairs,
    held_out_users,
)
from ml.time_split import without_pairs

PAIR_SCHEMA = pa.schema(
    [
        ("query_type", pa.string()),
        ("query_id", pa.int64()),
        ("pos_type", pa.string()),
        ("pos_id", pa.int64()),
        ("source", pa.string()),
        ("segment", pa.string()),
        ("weight", pa.float32()),
        ("count", pa.int64()),
    ]
)
SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("history", pa.list_(pa.int64())),
        ("future", pa.list_(pa.int64())),
    ]
)
NODE_SCHEMA = pa.schema([("entity_type", pa.string()), ("entity_id", pa.int64())])
OUTPUT_TABLES = (
    "pairs",
    "eval_pairs",
    "sequences",
    "eval_sequences",
    "feature_nodes",
    "eval_feature_nodes",
    "universe",
    "future_pairs",
)

#: Pair sources, their query/positive types.
ENGAGEMENT_SOURCES = {"engagement_pin_pin": ("pin", "pin"), "engagement_board_pin": ("board", "pin")}
#: Co-engagement: two pins one user engaged within ``coengagement_window`` events of each other (both
#: directions, weighted by how often): the signal item co-occurrence counts, as eq. 2 pairs D_pair.
COENGAGEMENT_SOURCE = "coengagement_pin_pin"
#: Graph pair sources: (query type, neighbour block (subset, node type)).
GRAPH_SOURCES = {
    "graph_pin_pin": ("pin", ("pin_pin", "pin")),
    "graph_pin_board_pin": ("pin", ("pin_board", "pin")),
    "graph_pin_board": ("pin", ("pin_board", "board")),
    "graph_board_pin": ("board", ("pin_board", "pin")),
}


@dataclass(frozen=True)
class ExampleConfig:
    # share of pairs / users / feature nodes held out, and the hash seed: the graph's pruned_edges must drop
    # the same pairs (``holdout()`` -> ``prune_window(..., holdout=...)``), so both default to holdout's
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    holdout_seed: int = DEFAULT_HOLDOUT_SEED
    t_max: int = 32  # sequence length t_max (3.3.3)
    future_delta: int = 8  # Delta: future actions kept after t_max for eq. 5
    # training windows end every ``sequence_stride`` engagements of a user's history (0: one window per user,
    # the last t_max + Delta before the cutoff); half of t_max by default (not in the paper)
    sequence_stride: int = 16
    eval_horizon_days: int = 2  # user-entity evaluation: engagement in the window's last days is "future"
    sample_seed: int = 0
    graph_pairs_per_node: int = 2  # draws per (graph node, graph source); repeated draws are merged
    # co-engagement pairs: pins within this many events of each other in one user's history (0: none)
    coengagement_window: int = 5
    source_weights: dict[str, float] = field(
        default_factory=lambda: {s: 1.0 for s in (*ENGAGEMENT_SOURCES, COENGAGEMENT_SOURCE, *GRAPH_SOURCES)}
    )


def holdout_of(config: ExampleConfig) -> Holdout:
    """The ``graph_engine.holdout.Holdout`` the edge engine must drop from the graph for these examples."""
    return Holdout(fraction=config.eval_fraction, seed=config.holdout_seed)


def _pair_table(query_type, query_ids, pos_type, pos_ids, source, segments, weight, counts) -> pa.Table:
    n = len(query_ids)
    const = lambda v: pa.repeat(pa.scalar(v, pa.string()), n)
    return pa.table(
        {
            "query_type": const(query_type),
            "query_id": pa.array(np.asarray(query_ids, dtype=np.int64)),
            "pos_type": const(pos_type),
            "pos_id": pa.array(np.asarray(pos_ids, dtype=np.int64)),
            "source": const(source),
            "segment": pa.nulls(n, pa.string()) if segments is None else pa.array(segments, pa.string()),
            "weight": pa.array(np.full(n, weight, dtype=np.float32)),
            "count": pa.array(np.asarray(counts, dtype=np.int64)),
        },
        schema=PAIR_SCHEMA,
    )


def pair_logs_view(con: duckdb.DuckDBPyConnection, config: ExampleConfig, cutoff_ts: str) -> str:
    """Create view ``pair_logs``: the window's events less the held-out users' events at or after
    ``cutoff_ts`` (their user-entity future, paper 4.2.1), so no evaluation future becomes a training pair."""
    stages, flag = holdout_of(config).user_sql_stages("duckdb", "_user_type", "user_id")
    flagged = "SELECT *, 'user' AS _user_type FROM logs"
    for col, expr in stages:
        flagged = f"SELECT *, {expr} AS {col} FROM ({flagged})"
    future = f"coalesce({flag}, false) AND event_ts >= TIMESTAMPTZ '{cutoff_ts}'"
    con.execute(f"CREATE OR REPLACE TEMP VIEW pair_logs AS SELECT * FROM ({flagged}) WHERE NOT ({future})")
    return "pair_logs"


def engagement_pairs(con: duckdb.DuckDBPyConnection, config: ExampleConfig, logs: str = "logs") -> pa.Table:
    """Distinct engaged pairs of the ``logs`` view with their counts and the engaged pin's segment."""
    rows = con.sql(
        f"""
        SELECT 'engagement_pin_pin' AS source, 'pin' AS query_type, query_pin_id AS query_id,
               pin_id AS pos_id, count(*) AS n
        FROM {logs}
        WHERE surface = 'related_pins' AND action IN ('save', 'click')
          AND query_pin_id IS NOT NULL AND query_pin_id <> pin_id
        GROUP BY ALL
        UNION ALL
        SELECT 'engagement_board_pin', 'board', board_id, pin_id, count(*)
        FROM {logs} WHERE action = 'save' AND board_id IS NOT NULL
        GROUP BY ALL
        ORDER BY source, query_id, pos_id
        """
    ).arrow()
    rows = rows.read_all() if hasattr(rows, "read_all") else rows
    tables = []
    for source, (qt, pt) in ENGAGEMENT_SOURCES.items():
        sel = rows.filter(pa.compute.equal(rows["source"], source))
        tables.append(
            _pair_table(
                qt,
                sel["query_id"].to_numpy(),
                pt,
                sel["pos_id"].to_numpy(),
                source,
                None,
                config.source_weights.get(source, 1.0),
                sel["n"].to_numpy(),
            )
        )
    return pa.concat_tables(tables)


def coengagement_pairs(con: duckdb.DuckDBPyConnection, config: ExampleConfig, logs: str = "logs") -> pa.Table:
    """Pin pairs one user engaged within ``coengagement_window`` events of each other, both directions, with
    how many times (``COENGAGEMENT_SOURCE``); empty when the window is 0."""
    w = int(config.coengagement_window)
    query = f"""
        WITH seq AS (
            SELECT user_id, pin_id,
                   row_number() OVER (PARTITION BY user_id ORDER BY event_ts, pin_id, action, surface) AS rn
            FROM {logs}
        ), near AS (
            SELECT a.pin_id AS q, b.pin_id AS p FROM seq a JOIN seq b
              ON a.user_id = b.user_id AND b.rn > a.rn AND b.rn <= a.rn + {w}
            WHERE a.pin_id <> b.pin_id
        )
        SELECT q AS query_id, p AS pos_id, count(*) AS n
        FROM (SELECT q, p FROM near UNION ALL SELECT p, q FROM near)
        GROUP BY ALL ORDER BY query_id, pos_id
    """
    rows = _fetch(con, query) if w > 0 else pa.table({"query_id": [], "pos_id": [], "n": []})
    return _pair_table(
        "pin",
        rows["query_id"].to_numpy(zero_copy_only=False),
        "pin",
        rows["pos_id"].to_numpy(zero_copy_only=False),
        COENGAGEMENT_SOURCE,
        None,
        config.source_weights.get(COENGAGEMENT_SOURCE, 1.0),
        rows["n"].to_numpy(zero_copy_only=False),
    )


def future_pairs(con: duckdb.DuckDBPyConnection, config: ExampleConfig, logs: str, cutoff_ts: str) -> pa.Table:
    """Engagement and co-engagement pairs of ``logs`` first engaged at or after ``cutoff_ts``: none of their
    events, in either direction, before it (the time split, ``ml.time_split``)."""
    at = f"TIMESTAMPTZ '{cutoff_ts}'"
    con.execute(f"CREATE OR REPLACE TEMP VIEW logs_before AS SELECT * FROM {logs} WHERE event_ts < {at}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW logs_after AS SELECT * FROM {logs} WHERE event_ts >= {at}")
    of = lambda view: pa.concat_tables([engagement_pairs(con, config, view), coengagement_pairs(con, config, view)])
    return without_pairs(of("logs_after"), of("logs_before"))


def graph_pairs(snapshot, neighborhoods, config: ExampleConfig, partition_seed: int) -> pa.Table:
    """One pair per (graph node, configured source): u and a uniform draw among the real neighbours of the
    source's block of N(u) (``neighborhoods.layout`` names the blocks)."""
    layout = neighborhoods.layout
    rng = np.random.default_rng([config.sample_seed, partition_seed])
    n = int(snapshot.num_nodes)
    node_type = np.asarray(snapshot.node_type)
    node_id = np.asarray(snapshot.node_id)
    hood = neighborhoods.get(np.arange(n, dtype=np.int64)) if n else None
    block_of = {(b.subset, b.node_type): (off, b.k) for b, off in zip(layout.blocks, layout.offsets)}
    tables = []
    for source, (query_type, block) in GRAPH_SOURCES.items():
        if block not in block_of or n == 0:
            continue
        off, k = block_of[block]
        nodes = np.flatnonzero(node_type == NODE_TYPE_CODE[query_type])
        mask = hood.mask[nodes, off : off + k]
        counts = mask.sum(axis=1)
        has = counts > 0
        nodes, counts = nodes[has], counts[has]
        # Real neighbours come first in a block, so a uniform index below the count picks one of them.
        draws = max(1, int(config.graph_pairs_per_node))
        rep_nodes = np.repeat(nodes, draws)
        pick = (rng.random(rep_nodes.size) * np.repeat(counts, draws)).astype(np.int64)
        neighbour = hood.index[rep_nodes, off + pick].astype(np.int64)
        # repeated draws of one (u, v) are one pair; count = how often it was drawn
        pair_key = np.unique(np.stack([rep_nodes, neighbour], axis=1), axis=0, return_counts=True)
        (uq, times) = pair_key
        tables.append(
            _pair_table(
                query_type,
                node_id[uq[:, 0]],
                block[1],
                node_id[uq[:, 1]],
                source,
                None,
                config.source_weights.get(source, 1.0),
                times.astype(np.int64),
            )
        )
    return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()


def _attach_segments(pairs: pa.Table, pin_segments: pa.Table | None) -> pa.Table:
    """segment = the engaged (positive) pin's segment; null for board positives or pins without metadata."""
    if pin_segments is None or pairs.num_rows == 0:
        return pairs
    con = duckdb.connect()
    con.register("pairs", pairs)
    con.register("segments", pin_segments)
    out = con.sql(
        """
        SELECT p.query_type, p.query_id, p.pos_type, p.pos_id, p.source,
               CASE WHEN p.pos_type = 'pin' THEN s.segment END AS segment, p.weight, p.count
        FROM pairs p LEFT JOIN segments s ON p.pos_id = s.pin_id
        ORDER BY p.source, p.query_id, p.pos_id
        """
    ).arrow()
    out = out.read_all() if hasattr(out, "read_all") else out
    return out.cast(PAIR_SCHEMA)


def holdout_type_codes(types, where: str = "type column") -> np.ndarray:
    """Entity type names (a string column) -> graph_engine.holdout.TYPE_CODE, vectorised."""
    names = sorted(TYPE_CODE)
    col = pa.chunked_array([types]) if isinstance(types, pa.Array) else types
    if not isinstance(col, pa.ChunkedArray):
        col = pa.chunked_array([pa.array(np.asarray(types).astype(str), pa.string())])
    idx = pc.index_in(col, value_set=pa.array(names, pa.string()))
    if idx.null_count:
        bad = pc.filter(col, pc.is_null(idx))[0]
        raise ValueError(f"{where}: unknown entity type {bad.as_py()!r} (known: {names})")
    codes = np.array([TYPE_CODE[n] for n in names], dtype=np.int64)
    return codes[np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)]


def held_out_pair_mask(pairs: pa.Table, config: ExampleConfig) -> np.ndarray:
    """bool [rows]: the pair (query, positive) is held out (unordered pair hash)."""
    if pairs.num_rows == 0:
        return np.zeros(0, dtype=bool)
    return held_out_pairs(
        config.holdout_seed,
        config.eval_fraction,
        holdout_type_codes(pairs["query_type"], "pairs.query_type"),
        pairs["query_id"].to_numpy(),
        holdout_type_codes(pairs["pos_type"], "pairs.pos_type"),
        pairs["pos_id"].to_numpy(),
    )


def _split_pairs(pairs: pa.Table, config: ExampleConfig) -> tuple[pa.Table, pa.Table]:
    held = held_out_pair_mask(pairs, config)
    return pairs.filter(pa.array(~held)), pairs.filter(pa.array(held))


def drop_held_out_edges(edges: pa.Table, config: ExampleConfig = ExampleConfig()) -> pa.Table:
    """Daily edges (contract "Edges" columns) without the edges whose endpoint pair is held out.

    The contract's evaluation protocol: "the graph used to embed an evaluation query never contains the
    evaluation pair's own edge". Engagement pairs are exactly the edges' endpoint pairs (pin_board = a
    board -> pin save pair, pin_pin = a related-pins pair), and the pair hash is unordered, so dropping
    held-out endpoint pairs here keeps every held-out engagement pair out of every day's graph. Same
    ``holdout_seed`` / ``eval_fraction`` as the training examples, or the two disagree."""
    if edges.num_rows == 0:
        return edges
    held = held_out_pairs(
        config.holdout_seed,
        config.eval_fraction,
        holdout_type_codes(edges["src_type"], "edges.src_type"),
        edges["src_id"].to_numpy(),
        holdout_type_codes(edges["dst_type"], "edges.dst_type"),
        edges["dst_id"].to_numpy(),
    )
    return edges.filter(pa.array(~held))


def _fetch(con, sql: str) -> pa.Table:
    """A query's full result as an Arrow table (DuckDB >= 1.4 returns a reader from ``.arrow()``; draining
    it here frees the connection for the next query)."""
    out = con.sql(sql).arrow()
    return out.read_all() if hasattr(out, "read_all") else out


def user_sequences(con, config: ExampleConfig, cutoff_ts) -> tuple[pa.Table, pa.Table]:
    """Training sequences (non-held-out users, engagement before ``cutoff_ts``: nothing of the evaluation
    horizon is trained on) and evaluation sequences (held-out users: history before ``cutoff_ts``, future
    after it)."""
    t_max, delta = config.t_max, config.future_delta
    for view, where in (("ordered", ""), ("ordered_train", f"WHERE event_ts < TIMESTAMPTZ '{cutoff_ts}'")):
        con.execute(
            f"""
            CREATE OR REPLACE TEMP VIEW {view} AS
            SELECT user_id, pin_id, event_ts,
                   row_number() OVER (PARTITION BY user_id ORDER BY event_ts, pin_id, action, surface) AS rn,
                   count(*) OVER (PARTITION BY user_id) AS n
            FROM logs {where}
            """
        )
    train = _fetch(con, _training_windows_sql(t_max, delta, config.sequence_stride))
    evaluation = _fetch(
        con,
        f"""
        WITH marked AS (
            SELECT *, event_ts < TIMESTAMPTZ '{cutoff_ts}' AS before FROM ordered
        ), hist AS (
            SELECT *, row_number() OVER (PARTITION BY user_id, before ORDER BY rn DESC) AS back,
                      row_number() OVER (PARTITION BY user_id, before ORDER BY rn) AS fwd
            FROM marked
        )
        SELECT user_id,
               list(pin_id ORDER BY rn) FILTER (WHERE before AND back <= {t_max}) AS history,
               list(pin_id ORDER BY rn) FILTER (WHERE NOT before AND fwd <= {delta}) AS future
        FROM hist GROUP BY user_id
        HAVING count(*) FILTER (WHERE before) >= 1 AND count(*) FILTER (WHERE NOT before) >= 1
        ORDER BY user_id
        """,
    )
    train, evaluation = train.cast(SEQUENCE_SCHEMA), evaluation.cast(SEQUENCE_SCHEMA)
    train_held = held_out_users(config.holdout_seed, config.eval_fraction, train["user_id"].to_numpy())
    eval_held = held_out_users(config.holdout_seed, config.eval_fraction, evaluation["user_id"].to_numpy())
    return train.filter(pa.array(~train_held)), evaluation.filter(pa.array(eval_held))


def _training_windows_sql(t_max: int, delta: int, stride: int) -> str:
    """Training sequences as windows over each user's engagement before the cutoff: the last window ends
    Delta engagements before the user's last (those are its eq. 5 future), and earlier windows end every
    ``stride`` engagements before it, each with the Delta engagements after it as its future. One window per
    user (``stride`` 0) would train T on each user's last t_max + Delta engagements only, the same few
    hundred sequences every epoch on a data set of long histories."""
    ends = f"range(n_hist, 1, -{stride})" if stride > 0 else "[n_hist]"
    return f"""
        WITH users AS (
            SELECT user_id, max(n) AS n, max(n) - least({delta}, greatest(max(n) - 2, 0)) AS n_hist
            FROM ordered_train GROUP BY user_id HAVING max(n) >= 2
        ), windows AS (
            SELECT user_id, n, n_hist, unnest({ends}) AS window_end FROM users
        )
        SELECT w.user_id,
               list(o.pin_id ORDER BY o.rn) FILTER (WHERE o.rn <= w.window_end) AS history,
               coalesce(list(o.pin_id ORDER BY o.rn) FILTER (WHERE o.rn > w.window_end), []) AS future
        FROM windows w JOIN ordered_train o
          ON o.user_id = w.user_id AND o.rn > w.window_end - {t_max} AND o.rn <= w.window_end + {delta}
        GROUP BY w.user_id, w.window_end ORDER BY w.user_id, w.window_end DESC
        """


def feature_nodes(snapshot, config: ExampleConfig) -> tuple[pa.Table, pa.Table]:
    node_type = np.asarray(snapshot.node_type)
    node_id = np.asarray(snapshot.node_id)
    codes = np.where(node_type == NODE_TYPE_CODE["pin"], TYPE_CODE["pin"], TYPE_CODE["board"])
    held = held_out_entities(config.holdout_seed, config.eval_fraction, codes, node_id)
    table = pa.table(
        {"entity_type": _type_names(node_type == NODE_TYPE_CODE["pin"]), "entity_id": node_id},
        schema=NODE_SCHEMA,
    )
    return table.filter(pa.array(~held)), table.filter(pa.array(held))


def _type_names(is_pin: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(
        pa.array(np.where(is_pin, 0, 1).astype(np.int32)), pa.array(["pin", "board"])
    ).cast(pa.string())


def universe_table(snapshot, pins_dir: Path | None, boards_dir: Path | None) -> pa.Table:
    """Every pin and board of the day: graph nodes + metadata rows (contract: metadata rows of entities
    never engaged still get embeddings). Sorted by (type, id), unique."""
    node_type = np.asarray(snapshot.node_type)
    node_id = np.asarray(snapshot.node_id, dtype=np.int64)
    parts = []
    for name, folder, column in (("pin", pins_dir, "pin_id"), ("board", boards_dir, "board_id")):
        ids = [node_id[node_type == NODE_TYPE_CODE[name]]]
        if folder is not None and any(Path(folder).glob("*.parquet")):
            meta = pq.read_table(Path(folder), columns=[column])[column]
            ids.append(np.asarray(meta.drop_null().to_numpy(zero_copy_only=False), dtype=np.int64))
        uniq = np.unique(np.concatenate(ids))
        parts.append(
            pa.table(
                {"entity_type": _type_names(np.full(uniq.size, name == "pin")), "entity_id": uniq},
                schema=NODE_SCHEMA,
            )
        )
    return pa.concat_tables(parts)


def build_training_examples(
    log_files: list[Path],
    pins_dir: Path | None,
    snapshot,
    neighborhoods,
    out_dir: Path,
    window_end: str,
    config: ExampleConfig = ExampleConfig(),
    boards_dir: Path | None = None,
) -> dict:
    """Write pairs / sequences / feature nodes (train and eval) and the universe as Parquet into ``out_dir``
    (``OUTPUT_TABLES``; read back with ``ml.training_examples_reader.load_training_examples``); return the
    manifest.

    ``log_files``: the validated logs of the window ending at ``window_end``; ``pins_dir`` / ``boards_dir``:
    the day's validated metadata (``boards_dir`` defaults to ``pins_dir``'s sibling ``boards``);
    ``neighborhoods``: a ``NeighborSampler`` or ``NeighborhoodCache`` (its ``layout`` names the blocks)."""
    from datetime import date, datetime, timedelta

    out_dir = Path(out_dir)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    if log_files:
        # (a view cannot take a prepared parameter: register the relation instead)
        con.read_parquet([str(p) for p in log_files], union_by_name=True).create_view("logs")
    else:
        con.execute(
            "CREATE TABLE logs (event_ts TIMESTAMPTZ, user_id BIGINT, action VARCHAR, surface VARCHAR, "
            "pin_id BIGINT, board_id BIGINT, query_pin_id BIGINT)"
        )
    pin_segments = None
    if pins_dir is not None and any(Path(pins_dir).glob("*.parquet")):
        pin_segments = pq.read_table(Path(pins_dir), columns=["pin_id", "segment"])

    end = datetime.combine(date.fromisoformat(window_end) + timedelta(days=1), datetime.min.time(), UTC)
    cutoff = end - timedelta(days=config.eval_horizon_days)
    cutoff_ts = cutoff.strftime("%Y-%m-%d %H:%M:%S+00")
    partition_seed = date.fromisoformat(window_end).toordinal()
    graph = graph_pairs(snapshot, neighborhoods, config, partition_seed)
    # The test pairs come from every event; the training pairs leave out the held-out users' future.
    every = pa.concat_tables([engagement_pairs(con, config), coengagement_pairs(con, config), graph])
    _, eval_pairs = _split_pairs(_attach_segments(every, pin_segments), config)
    pair_logs = pair_logs_view(con, config, cutoff_ts)
    no_future = pa.concat_tables([engagement_pairs(con, config, pair_logs), coengagement_pairs(con, config, pair_logs)])
    train_pairs, _ = _split_pairs(_attach_segments(pa.concat_tables([no_future, graph]), pin_segments), config)
    # (a held-out test pair stays a test pair: the time split takes only pairs training may see)
    time_split, _ = _split_pairs(
        _attach_segments(future_pairs(con, config, pair_logs, cutoff_ts), pin_segments), config
    )
    train_seq, eval_seq = user_sequences(con, config, cutoff_ts)
    train_nodes, eval_nodes = feature_nodes(snapshot, config)
    if boards_dir is None and pins_dir is not None and (Path(pins_dir).parent / "boards").is_dir():
        boards_dir = Path(pins_dir).parent / "boards"
    universe = universe_table(snapshot, pins_dir, boards_dir)

    outputs = {
        "pairs": train_pairs,
        "eval_pairs": eval_pairs,
        "sequences": train_seq,
        "eval_sequences": eval_seq,
        "feature_nodes": train_nodes,
        "eval_feature_nodes": eval_nodes,
        "universe": universe,
        "future_pairs": time_split,
    }
    counts = {}
    for name, table in outputs.items():
        pq.write_table(table, out_dir / f"{name}.parquet")
        counts[name] = table.num_rows
    per_source = {}
    for name in ("pairs", "eval_pairs", "future_pairs"):
        vc = pc.value_counts(outputs[name]["source"]).to_pylist() if outputs[name].num_rows else []
        per_source[name] = {d["values"]: int(d["counts"]) for d in sorted(vc, key=lambda d: d["values"])}
    manifest = {
        "window_end": window_end,
        "user_eval_cutoff": cutoff.isoformat(),
        "config": asdict(config),
        "counts": counts,
        "per_source": per_source,
        "log_files": len(log_files),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
