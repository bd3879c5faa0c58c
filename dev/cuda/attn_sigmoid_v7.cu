/*
DIFFormer-a (sigmoid) attention, exact fp32 on the CUDA cores: version 7 = version 6
(attn_sigmoid_v6.cu) with two changes found by an ncu run of v6 on the H200 (2026-11-29, N = 3e4, d = 64):
  - v6's fused backward kernel (dkvq) spent 59% of its warp samples stalled on "no instructions"
    (instruction fetch: the fully unrolled dot_tile x 2 + acc_px x 2 + dQ loop are far larger
    than the instruction cache), issue slots 34% busy against the forward's 61%. v7 unrolls the
    outer column / key loops of the backward by SIG_BWD_UR (4 here) instead of fully (16), and
    the forward by SIG_FWD_UR (16, as v6).
  - stores of the score tiles had 2-way bank conflicts (row stride 68 = 4 banks mod 32 with a
    warp's 4 x 8 lanes); SIG_KLP_PAD = 8 makes the row stride 72 (8 banks mod 32): conflict-free, but measured no
    faster (variants B and F), so 4 is kept.
It is version 6's file built with other values of its knobs (SIG_BWD_UR, SIG_FWD_UR, SIG_KLP_PAD,
SIG_DQ_UR; defined below unless given on the command line). The measured variants (the log) were
A = 16/16/4 (v6), B = 16/2/8, C = 4/4/8, D = 8/1/8, E = 2/2/4, F = 16/2/4 (FWD/BWD/PAD); the library
took FWD 16, BWD 4, PAD 4 (src/ops/cuda/attn_sigmoid.cu, kUnrollFwd / kUnrollBwd).
Build: nvcc -O3 -arch=sm_90 -std=c++17 [-DSIG_BWD_UR=.. -DSIG_FWD_UR=.. -DSIG_KLP_PAD=..] \
         dev/cuda/attn_sigmoid_v7.cu -o /tmp/attn_sigmoid_v7
Run:   /tmp/attn_sigmoid_v7 [sizes]   (validation against fp64, then timing)
       SIG_PROFILE=1 /tmp/attn_sigmoid_v7 30000   (one fused forward + backward, for ncu)
Results: attn_sigmoid_v7.h200.log (its "v6pass" / "v6fused" rows are these kernels: the names
printed are version 6's).
*/
#ifndef SIG_BWD_UR
#define SIG_BWD_UR 4
#endif
#ifndef SIG_KLP_PAD
#define SIG_KLP_PAD 4
#endif
#include "attn_sigmoid_v6.cu"

