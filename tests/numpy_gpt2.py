"""An independent float64 NumPy GPT-2 forward, written from the GPT-2 definition (not from ops.py)."""
import numpy as np


def _layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def forward(params, idx, config):
    """Returns (logits (B, T, Vp), per-token log-softmax over the first V columns)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = idx.shape
    C, NH = config.C, config.NH
    HS = C // NH
    x = p["wte"][idx] + p["wpe"][:T]
    for l in range(config.L):
        h = _layernorm(x, p["ln1w"][l], p["ln1b"][l])
        qkv = h @ p["qkvw"][l].T + p["qkvb"][l]
        q, k, v = np.split(qkv, 3, axis=-1)
        out = np.zeros_like(q)
        for b in range(B):
            for head in range(NH):
                sl = slice(head * HS, (head + 1) * HS)
                for t in range(T):
                    scores = q[b, t, sl] @ k[b, :t + 1, sl].T / np.sqrt(HS)
                    w = np.exp(scores - scores.max())
                    w /= w.sum()
                    out[b, t, sl] = w @ v[b, :t + 1, sl]
        x = x + out @ p["attprojw"][l].T + p["attprojb"][l]
        h = _layernorm(x, p["ln2w"][l], p["ln2b"][l])
        h = _gelu(h @ p["fcw"][l].T + p["fcb"][l])
        x = x + h @ p["fcprojw"][l].T + p["fcprojb"][l]
    x = _layernorm(x, p["lnfw"], p["lnfb"])
    logits = x @ p["wte"].T
    z = logits[..., :config.V]
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return logits, logp


def loss(params, idx, targets, config):
    _, logp = forward(params, idx, config)
    return -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
