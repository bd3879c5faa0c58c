"""Checks a pure-Python model of PyTorch's CPU random streams against torch itself.

The model: torch.manual_seed(s) seeds an MT19937 (init_genrand with s); uniform_(a, b) on a
float tensor draws one 32-bit output per element, x = (r & 0xFFFFFF) * 2^-24, value = x*(b-a)+a;
nn.Linear draws weight [out, in] (row-major) then bias, with bound 1/sqrt(fan_in).
Dropout (F.dropout, training) is noise.bernoulli_(1-p), noise /= (1-p), out = x * noise:
  * without MKL: one draw per element, u = (random64 & (2^53-1)) * 2^-53, kept when u < 1-p
  * with MKL: one 32-bit output seeds an MCG31m1 stream (a = 1132489760, m = 2^31-1) and
    viRngBernoulli(ICDF) gives element i from the stream's i-th uniform.
Prints which hypotheses match torch exactly.
"""
import math, sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class MT:
    def __init__(self, seed):
        self.mt = [0] * 624
        self.mt[0] = seed & 0xffffffff
        for i in range(1, 624):
            self.mt[i] = (1812433253 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)) + i) & 0xffffffff
        self.idx = 624

    def next(self):
        if self.idx >= 624:
            for i in range(624):
                y = (self.mt[i] & 0x80000000) | (self.mt[(i + 1) % 624] & 0x7fffffff)
                self.mt[i] = self.mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908b0df if y & 1 else 0)
            self.idx = 0
        y = self.mt[self.idx]; self.idx += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9d2c5680
        y ^= (y << 15) & 0xefc60000
        y ^= y >> 18
        return y

    def next64(self):
        hi = self.next(); lo = self.next()
        return (hi << 32) | lo


def uniform_f32(mt, n, lo, hi, acc):
    out = np.empty(n, np.float32)
    for i in range(n):
        x = (mt.next() & 0xFFFFFF) * 2.0 ** -24
        if acc == 'f32':
            out[i] = np.float32(np.float32(x) * (np.float32(hi) - np.float32(lo)) + np.float32(lo))
        else:
            out[i] = np.float32(x * (float(np.float32(hi)) - float(np.float32(lo))) + float(np.float32(lo)))
    return out


def check_init(seed, fan_in, fan_out):
    torch.manual_seed(seed)
    lin = nn.Linear(fan_in, fan_out)
    res = {}
    for acc in ('f32', 'f64'):
        mt = MT(seed)
        gain = math.sqrt(2.0 / (1 + 5))
        wb = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
        w = uniform_f32(mt, fan_in * fan_out, -wb, wb, acc)
        bb = 1 / math.sqrt(fan_in)
        b = uniform_f32(mt, fan_out, -bb, bb, acc)
        res[acc] = (np.array_equal(w, lin.weight.detach().numpy().ravel()),
                    np.array_equal(b, lin.bias.detach().numpy()))
    return res


M31 = 2 ** 31 - 1
A31 = 1132489760


def mcg31_keep(seed32, n, keep_p, variant):
    x = seed32 % M31
    if x == 0:
        x = 1
    out = np.empty(n, np.int64)
    for i in range(n):
        if variant.startswith('pre'):  # first output is the seed state itself
            u = x / M31; x = (A31 * x) % M31
        else:
            x = (A31 * x) % M31; u = x / M31
        if variant.endswith('lt'):
            out[i] = 1 if u < keep_p else 0
        else:
            out[i] = 1 if u >= 1 - keep_p else 0
    return out


def check_dropout(seed, n, p):
    torch.manual_seed(seed)
    y = F.dropout(torch.ones(n), p=p, training=True)
    after = float(torch.rand(1).item())
    kept = (y != 0).numpy().astype(np.int64)
    scale_ok = bool(torch.all((y == 0) | (y == torch.tensor(1.0) / torch.tensor(1 - p, dtype=torch.float32))))
    res = {'scale': scale_ok}
    mt = MT(seed)
    d = np.array([1 if ((mt.next64() & ((1 << 53) - 1)) * 2.0 ** -53) < 1 - p else 0 for _ in range(n)])
    res['default'] = int((d == kept).sum())
    for variant in ('post-lt', 'post-ge', 'pre-lt', 'pre-ge'):
        mt = MT(seed)
        s = mt.next()
        res['mkl-' + variant] = int((mcg31_keep(s, n, 1 - p, variant) == kept).sum())
        nxt = float(np.float32((mt.next() & 0xFFFFFF) * 2.0 ** -24))
        res['mt-draws-1'] = nxt == after
    res['head'] = ''.join(map(str, kept[:24]))
    res['n'] = n
    return res


if __name__ == '__main__':
    print('torch', torch.__version__, 'mkl', torch.backends.mkl.is_available(), flush=True)
    for seed in (0, 1, 7):
        print('init', seed, check_init(seed, 4, 4), check_init(seed, 64, 7), flush=True)
    for seed, n, p in ((0, 80, 0.2), (3, 80, 0.2), (1, 5000, 0.5), (2, 2000, 0.2)):
        print('dropout', seed, n, p, check_dropout(seed, n, p), flush=True)
