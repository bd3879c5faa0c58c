#!/usr/bin/env python3
"""Independent NumPy reference of the mini-batch partition of SPEC.md section 3.

Reads tests/fixtures/partition_input.npz (written once by the C++ test
MinibatchFixture.DISABLED_WriteInput: a small directed graph with duplicate edges, self-loops
and weights, the batch sizes, and the epoch permutations of difformer's epoch_permutation), and
writes the partition the official pipeline (main-batch.py) would produce:

  1. remove_self_loops, then add_self_loops (one (i, i) per node appended at the end, weight 1);
  2. per epoch permutation `perm` and batch size B: chunks perm[k*B:(k+1)*B];
  3. per chunk torch_geometric.utils.subgraph(idx, edge_index, relabel_nodes=True): keep the
     edges with both ends in the chunk, in edge_index order, relabelled by POSITION in idx;
  4. the C++ Partitioner lists a chunk's edges target-major, so the edges are stably sorted by
     target position (the graph operator built from either order is identical).

Output members, for epoch e, batch size B, chunk k:
  e{e}_b{B}_chunks            number of chunks
  e{e}_b{B}_k{k}_nodes        global node ids (position p = row p of the chunk)
  e{e}_b{B}_k{k}_src / _dst   relabelled edges (int64)
  e{e}_b{B}_k{k}_w            their weights (float32)

Usage: /usr/bin/python3 scripts/np_partition_reference.py tests/fixtures/partition_input.npz \
           tests/fixtures/partition_reference.npz
"""
import sys

import numpy as np


def main(inp_path: str, out_path: str) -> None:
    inp = np.load(inp_path)
    n = int(inp["n"])
    ei = inp["edge_index"].astype(np.int64)
    w = inp["edge_weight"].astype(np.float32)
    perms = inp["perms"].astype(np.int64)
    batches = [int(b) for b in inp["batch_sizes"]]

    keep = ei[0] != ei[1]  # remove_self_loops
    src = np.concatenate([ei[0][keep], np.arange(n, dtype=np.int64)])  # add_self_loops
    dst = np.concatenate([ei[1][keep], np.arange(n, dtype=np.int64)])
    wt = np.concatenate([w[keep], np.ones(n, dtype=np.float32)])

    out = {}
    for e, perm in enumerate(perms):
        assert sorted(perm.tolist()) == list(range(n)), "not a permutation"
        for b in batches:
            chunks = [perm[lo:lo + b] for lo in range(0, n, b)]
            out[f"e{e}_b{b}_chunks"] = np.int64(len(chunks))
            for k, idx in enumerate(chunks):
                mask = np.zeros(n, dtype=bool)
                mask[idx] = True
                position = np.full(n, -1, dtype=np.int64)
                position[idx] = np.arange(len(idx), dtype=np.int64)
                em = mask[src] & mask[dst]
                s, d, ww = position[src[em]], position[dst[em]], wt[em]
                order = np.argsort(d, kind="stable")
                out[f"e{e}_b{b}_k{k}_nodes"] = idx.astype(np.int64)
                out[f"e{e}_b{b}_k{k}_src"] = s[order]
                out[f"e{e}_b{b}_k{k}_dst"] = d[order]
                out[f"e{e}_b{b}_k{k}_w"] = ww[order].astype(np.float32)
    np.savez(out_path, **out)
    print(f"wrote {out_path}: {len(out)} arrays, n={n}, E={ei.shape[1]}, batches={batches}, epochs={len(perms)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
