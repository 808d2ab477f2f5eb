"""
mdlm.py: a Masked Diffusion Language Model, from scratch, in one file.

A GPT writes text left to right, one character per pass. A masked diffusion LM starts from a line
of [MASK] and replaces masks anywhere in the line, each pass seeing the whole line both ways.
Training is BERT's masked prediction with the share of masks drawn fresh for every window, the
losses weighted to bound the negative log-likelihood (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025).

Part 1 (sections 1-9) is a whole MDLM that trains, samples, fills blanks and scores. Part 2
(sections 10-17) holds the upgrades the defaults use and the tools that measure them. Below the
lesson, the harness (files, devices, checkpoints, the command line) runs it all: python mdlm.py
--train, then --sample, --complete "ROMEO:", --infill "To [___] or not to [___]", --eval.
Each section is a `# %%` cell; in a notebook, the `if NOTEBOOK:` demos run.
"""

import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# %% 1. Config -------------------------------------------------------------------------------------
# The numbers a reader tunes. Losses are in nats per character: natural logs.
# Divide by log 2 = 0.693 for bits per character.

@dataclass
class ModelConfig:           # the network (section 4)
    vocab_size: int = 66     # the 65 characters of Tiny Shakespeare, plus one id for [MASK]
    block_size: int = 256    # the context: how many characters the model reads at once
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    use_time: bool = True    # tell the model the share of its input that is hidden (section 4)
    causal: bool = False     # True: the same network reading left to right only, a GPT (section 16)

# 'base' has the shape of nanoGPT's character-level Shakespeare GPT, for a GPU. 'tiny' is for a CPU.
# Every eval_interval steps a training run scores held-out text on eval_iters batches (section 9).
PRESETS = {
    'base': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, use_time=True,
                 batch_size=64, max_iters=5000, lr=1e-3, eval_interval=250, eval_iters=50),
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, use_time=True,
                 batch_size=32, max_iters=5000, lr=3e-3, eval_interval=500, eval_iters=20),
}

SEED = 1337                # training's batches and noise, and sampling, unless --seed says otherwise
EVAL_SEED = 1234           # every evaluation scores the same windows with the same masks (section 9)
MASK_GLYPH = '■'           # how a hidden character is drawn on screen
HERE = os.path.dirname(os.path.abspath(__file__)) if '__file__' in globals() else os.getcwd()   # notebook: cwd
DEFAULT_DATA = os.path.join(HERE, 'input.txt')
NOTEBOOK = __name__ == '__main__' and 'ipykernel' in sys.modules   # the demos run in a notebook only
DEMO_ITERS = 1000          # training steps of the notebook's demo (section 6)

class CliError(Exception):
    """Bad input, such as an unknown character: the command line reports it in one line."""

# %% 2. Data ---------------------------------------------------------------------------------------
# Tiny Shakespeare, a character tokenizer, and one extra id, [MASK], that stands for a hidden
# character: V = vocab_size ids in all. x0 is a batch of clean text, shape (B, L): B windows of L
# characters (L = block_size). A GPT's target is its input shifted by one. Here the target is x0
# itself, and the input is x0 with holes in it.

class Tokenizer:
    """Characters <-> ids: the sorted characters of the text, then [MASK] as the last id, V - 1."""
    def __init__(self, chars):
        self.itos = list(chars)                     # id -> char; [MASK] is not in this list
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.mask_id = len(self.itos)
        self.vocab_size = len(self.itos) + 1        # the characters, plus [MASK]

    def encode(self, s):
        unknown = sorted(set(c for c in s if c not in self.stoi))
        if unknown:   # mapping it to some id would silently corrupt the input, so refuse
            raise CliError(f'characters not in the vocabulary: {" ".join(repr(c) for c in unknown)}')
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return ''.join(MASK_GLYPH if i == self.mask_id else self.itos[i] for i in ids)

def split_data(text, tok):
    """The first 90% for training, the last 10% held out for the likelihood, as nanoGPT does."""
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n_train = int(0.9 * len(data))
    return data[:n_train], data[n_train:]

# The random draws of training and evaluation are made on the CPU and then moved to the data's
# device, so that a seed picks the same windows and masks on every device. (Sampling draws on the
# model's device.)

def get_batch(data, batch_size, block_size, generator):
    """x0: (B, L) windows of clean text at random offsets. generator: a CPU one."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).to(data.device)
    return data[ix[:, None] + torch.arange(block_size, device=data.device)]   # (B, L)

if NOTEBOOK:   # demo: the text (input.txt, beside this file), its vocabulary, the two splits
    text = open(DEFAULT_DATA, encoding='utf-8').read()
    tok = Tokenizer(sorted(set(text)))
    train_data, val_data = split_data(text, tok)
    print(f'{len(text):,} characters, {tok.vocab_size} tokens (65 characters and [MASK])')
    print(f'{len(train_data):,} to train on, {len(val_data):,} held out')

# %% 3. The forward process ------------------------------------------------------------------------
# Text is destroyed a little at a time. Take a window of L characters.
# At noise level t in [0, 1], exactly k = round(tL) of them are replaced by [MASK].
# Which ones is a uniformly random set of k positions. The result is called xt.
# t = 0 is the clean text; t = 1 is a row of masks.
# Masks absorb: a hidden character stays hidden as t grows. With the same random numbers, a larger
# t hides the same characters and more.
# The model's whole task is to undo this: to say what stood under each mask.
# (MDLM flips a coin of chance t for each character instead; section 13 shows why only the count matters.)

def forward_mask(x0, t, mask_id, generator=None):
    """x0: (B, L) clean ids; t: (B,) noise levels. Returns xt (B, L) and mask (B, L).
    In row b, the round(t_b * L) positions with the smallest random numbers r are hidden."""
    r = torch.rand(x0.shape, generator=generator).to(x0.device)
    rank = r.argsort(1).argsort(1)                        # each position's rank by r, 0 first
    mask = rank < (t * x0.size(1)).round()[:, None]       # (B, L)
    return x0.masked_fill(mask, mask_id), mask

if NOTEBOOK:   # demo: one line of the play at five noise levels, with the same r: the masks only grow
    x0 = torch.tensor([tok.encode('First Citizen: Before we proceed any further, hear me speak.')])
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        xt, _ = forward_mask(x0, torch.tensor([t]), tok.mask_id, torch.Generator().manual_seed(0))
        print(f't={t:.2f}  {tok.decode(xt[0].tolist())}')

# %% 4. The model ----------------------------------------------------------------------------------
# A transformer reads xt and predicts x0 at every position. Shapes: C = n_embd channels, split into
# n_head heads of hs = C / n_head channels each. It is a GPT, block for block, with three changes
# that make it a diffusion model:
#   1) No causal mask: every position attends to every other, in both directions.
#   2) It may be told the noise level t (use_time): how, is explained below the attention.
#   3) It never predicts [MASK], because clean text never holds one: that logit is set to -inf.
#      MDLM calls this the substitution parameterisation, SUBS. Its second rule is that a character
#      the input shows is kept as it is: the loss scores hidden positions only, and the sampler
#      writes only where a mask is.
# Two details that a GPT may also have. Positions are rotary (RoPE, as in LLaMA and MDLM): each
# pair of channels of a query or key is turned by an angle proportional to its position, at its
# own frequency, so a score depends on the two positions only through their offset. And QK-norm:
# each head scales its queries to a root mean square (RMS) of 2 and its keys to 1, so no score
# q.k / sqrt(hs) exceeds 2 sqrt(hs), however large the weights grow.

def apply_rope(x, cos, sin):
    """Rotate each pair of channels (j, j + hs/2) of x (B, n_head, L, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, config.causal
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope):
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        query, key, value = qkv                                  # each (B, n_head, L, hs)
        query = 2 * F.rms_norm(query, (query.size(-1),))         # QK-norm; 2 measured best (lab/README.md)
        key = F.rms_norm(key, (key.size(-1),))
        query, key = apply_rope(query, *rope), apply_rope(key, *rope)
        dropout = self.dropout if self.training else 0.0
        # softmax(query key^T / sqrt(hs)) value, in one fused call; causal only in the GPT (section 16)
        y = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))

# How the model is told t: adaptive LayerNorm (adaLN), as in DiT, the diffusion transformer. Each
# block turns t's embedding into a shift and a scale of its LayerNorms' outputs,
# h = LN(x) * (1 + scale(t)) + shift(t). The layer that makes them starts at zero, so at step 0
# t changes nothing. (DiT's adaLN-Zero also has zero-initialised gates on the residual branches;
# here there are none, and the LayerNorms keep their own gains.)
# Is t needed at all? The best possible model's answer depends only on the visible characters, not
# on t (Ou et al. 2024), and here t is even the share of masks in the input. Measured here (one
# run each), the default without it (--no-time) ends 0.03 nats/char worse by --eval (README.md).
# cond, below, is t's embedding: the input of every block's adaLN.

TIME_DIM = 128   # width of the time embedding that feeds every block's adaLN

class Block(nn.Module):
    """A pre-LayerNorm transformer block, with adaLN when the model is told t."""
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(approximate='tanh'),
                                 nn.Linear(4 * C, C, bias=False))   # GPT-2's MLP
        self.drop = nn.Dropout(config.dropout)
        self.ada = nn.Linear(TIME_DIM, 4 * C) if config.use_time else None

    def forward(self, x, cond, rope):
        h1 = self.ln1(x)                                                   # (B, L, C)
        if self.ada is not None:                # cond: (B, TIME_DIM) -> four (B, 1, C)
            shift1, scale1, shift2, scale2 = self.ada(cond)[:, None, :].chunk(4, dim=-1)
            h1 = h1 * (1 + scale1) + shift1
        x = x + self.drop(self.attn(h1, rope))
        h2 = self.ln2(x)
        if self.ada is not None:
            h2 = h2 * (1 + scale2) + shift2
        return x + self.drop(self.mlp(h2))

class MDLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert not (config.causal and config.use_time), 'the GPT twin has no time input: use_time=False'
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU(),
                                      nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU()) if config.use_time else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight    # weight tying: reading and writing a char share a vector
        # RoPE: one angle per pair of channels and position, (L, hs/2); derived, so not saved
        hs = C // config.n_head
        freqs = 10000.0 ** (-torch.arange(0, hs, 2).float() / hs)
        angles = torch.outer(torch.arange(config.block_size).float(), freqs)
        self.register_buffer('rope_cos', angles.cos(), persistent=False)
        self.register_buffer('rope_sin', angles.sin(), persistent=False)
        # Init as GPT-2: N(0, 0.02), the residual projections scaled down by depth; adaLN at zero.
        residual = ('.attn.proj.weight', '.mlp.2.weight')          # not time_mlp.2.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(residual) else 0.02
                nn.init.normal_(p, std=std)
            if name.endswith('.bias') or '.ada.' in name:
                nn.init.zeros_(p)

    def time_embedding(self, t):
        """Sinusoids of t (B,) at geometric frequencies, then an MLP: (B, TIME_DIM)."""
        half = TIME_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]   # t in [0, 1], scaled like a position
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def forward(self, xt, t):
        """xt: (B, L) ids with [MASK]s; t: (B,) noise levels, None for the GPT. Returns logits (B, L, V)."""
        L = xt.size(1)
        x = self.drop(self.tok_emb(xt))                                     # (B, L, C)
        rope = (self.rope_cos[:L], self.rope_sin[:L])
        cond = self.time_embedding(t) if self.time_mlp is not None else None        # (B, TIME_DIM)
        for block in self.blocks:
            x = block(x, cond, rope)
        logits = self.head(self.ln_f(x)).float()                            # (B, L, V)
        # SUBS: [MASK] is never an answer, so an untrained model's loss is about log 65, not log 66
        mask_id = torch.tensor([self.config.vocab_size - 1], device=xt.device)
        return logits.index_fill(-1, mask_id, float('-inf'))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())   # the tied weights are counted once

if NOTEBOOK:   # demo: the tiny preset's model, untrained
    torch.manual_seed(SEED)
    config = ModelConfig(tok.vocab_size, **{k: v for k, v in PRESETS['tiny'].items() if hasattr(ModelConfig, k)})
    model = MDLM(config)
    print(f'{model.num_params() / 1e6:.2f}M parameters, {config}')

# %% 5. The loss -----------------------------------------------------------------------------------
# What should the model pay for its guesses? The intuitive answer: hide a random share of each
# window, and average the cross-entropy over all the hidden characters of the batch. That trains
# a fine denoiser, but its number is no likelihood. A small example shows what is one.
#
# Take a window of L = 3 characters, "abc". Picture a random-order (any-order) autoregressive model:
# it starts from three masks and reveals one character a step, in a random order, each step
# costing -log p(the true character | what is visible). Here p is the network's softmax, told
# t = k / L when k characters are hidden. In the order c, a, b the cost is
#     with 3 hidden: -log p(c | ■■■),  with 2 hidden: -log p(a | ■■c),  with 1 hidden: -log p(b | a■c).
# The three terms sum to -log of the probability that this order writes "abc".
# Now average over all 3! = 6 orders. Look at the step with 2 hidden characters. The hidden pair
# is {a, b} in 2 orders, {a, c} in 2 and {b, c} in 2, and within each pair's 2 orders each member
# is revealed next once. So every set of k hidden positions comes up equally often, and so does
# every member of it. On average, the step with k hidden costs
#     (1/k) * sum over the k hidden positions i of -log p(x_i | xt),
# the mean over the hidden ones. Add the steps for k = L, ..., 1 and divide by L: (1/L) times a
# sum over k = 1..L is the mean over a k drawn uniformly from 1..L. Per character, this is the
# NELBO (its name is explained below):
#     NELBO = E over k ~ uniform on 1..L, and a uniform set of k hidden positions,
#             of (1/k) * sum over the hidden i of -log p(x_i | xt).
# Why is it a bound? The model's chance of writing x is the average, over orders, of each
# order's probability of x. -log of an average is at most the average of the -logs (Jensen's
# inequality). So NELBO >= -log p(x) / L, with p the random-order model's probability. The name:
# p(x) is called the evidence, and -L * NELBO is a lower bound on log p(x), the evidence lower
# bound (ELBO). This any-order view is that of ARDM (Hoogeboom et al. 2022) and RADD (Ou et al.
# 2024). Section 7's sampler, revealing one character a step in a random order, is this model.
#
# The intuitive loss pools instead: a window with k hidden counts k times, so heavily masked
# windows weigh most. The NELBO takes each window's mean and weighs every k alike.
# So training draws k in 1..L and hides exactly k characters: forward_mask with t = k / L.
# It tells the model t. It pays the NELBO: the window's summed cross-entropy divided by k = tL.
# MDLM is BERT with a random number of masks and a 1/k weight: that is the whole trick.

def masked_ce(logits, x0, mask):
    """Cross-entropy at the masked positions only: (B, L), zero elsewhere."""
    return F.cross_entropy(logits.transpose(1, 2), x0, reduction='none') * mask

def naive_loss(logits, x0, mask):
    """The intuitive loss: the cross-entropy pooled over all the batch's masks. Not a bound."""
    return masked_ce(logits, x0, mask).sum() / mask.sum().clamp(min=1)

def nelbo_loss(logits, x0, mask, t):
    """The training loss: the NELBO above, averaged over the batch, in nats per character. t = k / L."""
    per_seq = masked_ce(logits, x0, mask).sum(1) / (t * x0.size(1))   # (B,): divided by k
    return per_seq.mean()

# Which k to draw. Drawing each row's k on its own gives a noisy loss. Stratified draws are
# steadier: one u ~ U(0, 1), shifted by i / B (mod 1) for row i, and k = 1 + floor(uL). Then the
# batch's counts spread evenly over 1..L.

def draw_t(batch_size, L, generator, device):
    """t = k / L (B,), with k stratified uniform on 1..L."""
    u = torch.rand(1, generator=generator).to(device)
    u = (u + torch.arange(batch_size, device=device) / batch_size) % 1
    k = (1 + (u * L).floor()).clamp(max=L)
    return k / L

# Untrained, the weights are small (std 0.02), so every logit is near 0 and the softmax is nearly
# uniform over the 65 characters that SUBS allows: each hidden character costs about log 65.

if NOTEBOOK:   # demo: untrained, the model guesses nearly uniformly among 65 characters
    gen = torch.Generator().manual_seed(SEED)
    x0 = get_batch(train_data, 32, config.block_size, gen)
    t = draw_t(32, config.block_size, gen, 'cpu')
    xt, mask = forward_mask(x0, t, tok.mask_id, gen)
    loss = nelbo_loss(model(xt, t), x0, mask, t)
    print(f'NELBO {loss.item():.3f}, log 65 = {math.log(65):.3f}')

# %% 6. One training step --------------------------------------------------------------------------
# Draw a batch and its noise; forward, loss, backward, clip, update.

def get_lr(it, lr, min_lr, warmup_iters, max_iters, decay_frac):
    """The learning rate at step `it`: warm up, hold, then decay linearly over the last decay_frac.
    A run shorter than ten warmups warms up over its first tenth instead."""
    warmup_iters = min(warmup_iters, max_iters // 10)
    if it < warmup_iters:                                        # 1) linear warmup from 0
        return lr * (it + 1) / warmup_iters
    decay_start = max(warmup_iters, (1 - decay_frac) * max_iters)   # 2) hold lr until here
    frac = (it - decay_start) / max(1, max_iters - decay_start)
    frac = min(1.0, max(0.0, frac))
    return lr - frac * (lr - min_lr)                             # 3) linear decay to min_lr

def training_batch(data, batch_size, block_size, mask_id, generator):
    """(x0, xt, mask, t): clean windows, and the same with k = tL of each hidden."""
    x0 = get_batch(data, batch_size, block_size, generator)
    t = draw_t(batch_size, block_size, generator, data.device)
    xt, mask = forward_mask(x0, t, mask_id, generator)
    return x0, xt, mask, t

def batch_loss(model, x0, xt, mask, t):
    """A training_batch's NELBO."""
    return nelbo_loss(model(xt, t), x0, mask, t)

def train_step(model, optimizers, batch, lr, loss_fn=batch_loss):
    """One step on a batch: loss_fn(model, *batch) is its loss. Returns the loss, detached."""
    for opt in optimizers:                                         # 1) this step's learning rate
        for group in opt.param_groups:
            group['lr'] = lr
    loss = loss_fn(model, *batch)                                  # 2) forward and loss
    loss.backward()                                                # 3) backward
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)        # 4) clip the gradient's norm at 1
    for opt in optimizers:                                         # 5) update, then clear
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()

if NOTEBOOK:   # demo: train the tiny model for DEMO_ITERS steps with AdamW, at 2e-3 (the presets' lr suit Muon)
    batch_size, block_size = PRESETS['tiny']['batch_size'], PRESETS['tiny']['block_size']
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for it in range(DEMO_ITERS):
        batch = training_batch(train_data, batch_size, block_size, tok.mask_id, gen)
        lr = get_lr(it, 2e-3, 1e-4, 100, DEMO_ITERS, 0.5)
        loss = train_step(model, [optimizer], batch, lr)
        if it % 100 == 0 or it == DEMO_ITERS - 1:
            print(f'step {it} | loss {loss.item():.4f}')
    model.eval()

# %% 7. Sampling -----------------------------------------------------------------------------------
# The reverse process runs section 3 backwards, from a row of masks to text, in `steps` passes.
# Say a pass starts with k characters hidden and should end with k - n_reveal hidden. Section 3 hid
# a uniformly random set, so the n_reveal characters that were still clean at the lower noise level
# (k - n_reveal hidden) are a uniformly random set of the k. So each pass
#   1) runs the model on x, for a distribution over the characters at every position;
#   2) picks n_reveal of the hidden positions, uniformly at random: exactly the reverse's choice;
#   3) draws a character for each picked position from the model's distribution, and reveals it.
# Step 3 draws the picked characters independently of each other, from one pass: that is the one
# approximation. With one reveal a pass there is none, and the loop is section 5's random-order
# model, which the NELBO bounds. With fewer passes than masks the sampler is faster, and the bound
# no longer covers the text it writes.
# Revealed characters are never touched again, so the same loop samples, completes a prompt
# and fills blanks. As in training, the model is told t = the share of its input still hidden.
# A row of M masks reveals M // steps a pass, and one more in the first M mod steps passes.
# Two rules are arguments, so that Part 2 adds rules to this one loop: `choose`, which hidden
# positions a pass reveals, and `draw`, how their characters are drawn. So are `fill`, the masks
# to fill (Part 2's semi-autoregressive sampler fills a few at a time), and `on_step`, which sees
# each pass (the command line's --show prints them). The model samples in eval mode (no dropout).

def draw_characters(logits, generator=None):
    """A character for every position, drawn from softmax(logits), and its probability: (B, L) each."""
    probs = logits.softmax(-1)                                                 # (B, L, V)
    flat = torch.multinomial(probs.flatten(0, 1), 1, generator=generator)      # (B * L, 1)
    chars = flat.view(probs.shape[:-1])
    return chars, probs.gather(-1, chars[..., None])[..., 0]

def top_n(todo, score, n_reveal):
    """The n_reveal[b] hidden positions of row b (todo, (B, L)) with the highest score (B, L)."""
    rank = score.masked_fill(~todo, float('-inf')).argsort(1, descending=True).argsort(1)   # 0: highest
    return todo & (rank < n_reveal[:, None])

def choose_random(todo, n_reveal, logits, prob, steps_left, generator):
    """The exact reverse: n_reveal[b] of row b's hidden positions, a uniformly random set.
    logits, prob and steps_left are not used here: Part 2's rules use them."""
    return top_n(todo, torch.rand(todo.shape, generator=generator, device=todo.device), n_reveal)

@torch.no_grad()
def denoise(model, x, steps, generator=None, fill=None, choose=choose_random, draw=draw_characters,
            on_step=None):
    """Fill the [MASK]s of x (B, L) that `fill` marks (default: all of them) in `steps` passes.
    on_step(x) sees the result of each pass. Returns the new x."""
    mask_id = model.config.vocab_size - 1
    x = x.clone()
    if fill is None:
        fill = x == mask_id
    M = fill.sum(1)                                                    # (B,) masks to fill
    for i in range(steps):
        todo = fill & (x == mask_id)                                   # (B, L) still hidden
        if not todo.any():
            break
        logits = model(x, (x == mask_id).float().mean(1))             # told t: the share hidden
        chars, prob = draw(logits, generator)                          # a candidate everywhere
        n_reveal = M // steps + (i < M % steps).long()                 # (B,)
        chosen = choose(todo, n_reveal, logits, prob, steps - i, generator)
        x = torch.where(chosen, chars, x)
        if on_step is not None:
            on_step(x)
    return x

if NOTEBOOK:   # demo: two lines out of pure noise, one character a pass
    masks = torch.full((2, config.block_size), tok.mask_id)
    out = denoise(model, masks, config.block_size, gen)
    print('\n\n'.join(tok.decode(row.tolist()) for row in out))

# %% 8. Completion and infilling -------------------------------------------------------------------
# The same loop, with some characters given. Completion: the prompt, then masks. Infilling:
# masks in the blanks and text on both sides, which a GPT cannot use: it never sees the right side.
# Both take `sample`, a function that fills the masks of a batch: for example denoise above.
# So both are one function here, for a text that fits in one window of L characters; section 17
# writes longer texts window by window.

def fill_window(model, ids, num_samples, sample):
    """num_samples copies of ids (a list of at most L ids, [MASK] where a character is wanted), filled
    by sample: (B, len(ids))."""
    assert len(ids) <= model.config.block_size, 'the text fits in one window'
    x = torch.tensor(ids, device=next(model.parameters()).device)
    return sample(x.repeat(num_samples, 1))

if NOTEBOOK:   # demo: continue a prompt; fill a blank from both sides
    sample = lambda x: denoise(model, x, x.size(1), gen)
    ids = tok.encode('ROMEO:\n') + [tok.mask_id] * (config.block_size - 7)   # one window: 7 + 57
    print(tok.decode(fill_window(model, ids, 1, sample)[0].tolist()))
    ids = tok.encode('To be, or not ') + [tok.mask_id] * 2 + tok.encode(' be.')
    print('\n'.join(tok.decode(row.tolist()) for row in fill_window(model, ids, 2, sample)))

# %% 9. Evaluation ---------------------------------------------------------------------------------
# An honest likelihood: held-out text, the same windows and masks every time, and low variance.
# The estimator is section 5's: exactly k hidden, with k spread evenly over 1..L across the batch,
# each window's cross-entropy divided by k (LLaDA's likelihood estimator). The notebook's demo
# (1000 AdamW steps) printed val NELBO 2.376 +- 0.030 below. The default run's tiny model, trained
# with Part 2's upgrades, is far better: `python mdlm.py --eval` printed
#   val nelbo: 1.8533 nats/char (2.6737 bits/char) +- 0.0092 (standard error, 100 batches of 32
#   windows of 64); perplexity <= 6.381 (an upper bound: the NELBO bounds -log p)
# The perplexity bound is an estimate, with its standard error, of a bound on section 5's model.

@torch.no_grad()
def nelbo_per_seq(model, x0, generator):
    """The NELBO's estimate for each window (B,), nats per character: exactly k_b = t_b L hidden."""
    batch_size, L = x0.shape
    t = draw_t(batch_size, L, generator, x0.device)
    xt, mask = forward_mask(x0, t, model.config.vocab_size - 1, generator)
    return masked_ce(model(xt, t), x0, mask).sum(1) / mask.sum(1)

@torch.no_grad()
def estimate_loss(model, data, n_batches, batch_size, seed=EVAL_SEED, per_seq=None):
    """Nats per character, and its standard error over n_batches seeded batches: the NELBO, or
    per_seq(model, x0) when given (section 14's exact likelihoods, section 16's GPT). The windows
    and the masks have CPU generators of their own, so every call scores the same ones on every
    device. A batch shares one stratified draw: the error is between batches."""
    assert per_seq is not None or not model.config.causal, 'a GPT is scored by its own per_seq'
    was_training = model.training
    model.eval()
    windows = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    means = []
    for _ in range(n_batches):
        x0 = get_batch(data, batch_size, model.config.block_size, windows)
        if per_seq is None:
            per_window = nelbo_per_seq(model, x0, noise)
        else:
            per_window = per_seq(model, x0)
        means.append(per_window.float().mean())
    model.train(was_training)
    m = torch.stack(means)
    se = (m.std() / math.sqrt(len(m))).item() if len(m) > 1 else float('nan')
    return m.mean().item(), se

if NOTEBOOK:   # demo: the trained model's bound on held-out text
    nelbo, se = estimate_loss(model, val_data, 10, 32)
    print(f'val NELBO {nelbo:.3f} +- {se:.3f} nats/char: perplexity <= {math.exp(nelbo):.2f}')

# %% ======================= THE CORE IS COMPLETE ==================================================
# Sections 1-9 are a whole MDLM. Part 2 below holds what the command line adds to it: the upgrades
# that the defaults use (10, 11, 15, and 12's draw), a baseline sampler (13), the exact likelihoods (14), the
# GPT that serves as the yardstick (16), and text longer than the context (17). Each cell says what
# it changes, why, and what was measured, with the command or the lab/README.md section that
# measured it. Nothing above uses anything below. The command line names a sampler by three flags:
# --rule, which hidden positions a pass reveals (random: section 7; ancestral: 13; surest: 14;
# confidence: 15); --steps, the passes a block takes; --semi-ar N, blocks of N masks filled left to
# right (section 15; 0: all the masks in one block). Samplers are compared "judged": the GPT twin
# (section 16) reads each written text and reports the bits per character it finds, given the text
# before each character; lower reads more like the play. Beside it stands the text's unigram
# entropy, the bits per character of its character counts: text that repeats itself also judges well.
# ================================================================================================

# %% 10. Upgrade: the cosine proposal --------------------------------------------------------------
# Changes: which k training draws (section 5 draws k uniformly on 1..L).
# Why: the loss is an average over k, and we may estimate an average with draws from any
# distribution q(k) > 0 (the proposal) if each draw is weighed by (1/L) / q(k): draws made more
# often than uniform count less. That is importance sampling: the expected loss stays the NELBO
# exactly; only its noise changes. Small k (few masks, an easy task, much text to see) turned out
# worth drawing more often. The cosine proposal maps the same stratified u to t = 1 - cos(pi u / 2)
# and k = ceil(tL). Its distribution function is F(s) = P(t <= s) = (2 / pi) acos(1 - s), so
# q(k) = F(k / L) - F((k - 1) / L).
# ("Logged val": the held-out bound that a training run logs at its end, section 9's estimator on
# the preset's eval_iters batches.)
# Measured: logged val 2.038 / 2.043 on two seeds against 2.055 / 2.068 for uniform k, at 2000 steps
# and an earlier commit (lab/README.md, "Exact mask counts"; today's command:
# python lab/lab.py --recipe t_proposal=uniform -- --train --max-iters 2000).

def draw_t_cosine(batch_size, L, generator, device):
    """t = k / L (B,), k from the cosine proposal, and each row's importance weight 1 / (L q(k))."""
    u = torch.rand(1, generator=generator).to(device)
    u = (u + torch.arange(batch_size, device=device) / batch_size) % 1
    k = torch.ceil(L * (1 - torch.cos(math.pi / 2 * u))).clamp(1, L)
    cdf = lambda s: (2 / math.pi) * torch.acos(1 - s)               # F(s) = P(cosine t <= s)
    return k / L, 1 / (L * (cdf(k / L) - cdf((k - 1) / L)))

# The recipe (section 11) picks one by name; uniform is section 5's draw, each weight 1
PROPOSALS = {'uniform': lambda B, L, g, device: (draw_t(B, L, g, device), torch.ones(B, device=device)),
             'cosine': draw_t_cosine}

def weighted_batch(data, batch_size, block_size, mask_id, generator, proposal=draw_t_cosine):
    """Section 6's training_batch with t from `proposal`, and each row's weight: (x0, xt, mask, t, weight)."""
    x0 = get_batch(data, batch_size, block_size, generator)
    t, weight = proposal(batch_size, block_size, generator, data.device)
    xt, mask = forward_mask(x0, t, mask_id, generator)
    return x0, xt, mask, t, weight

def weighted_loss(model, x0, xt, mask, t, weight):
    """A weighted_batch's NELBO: section 5's per-window term, times the window's weight."""
    per_seq = masked_ce(model(xt, t), x0, mask).sum(1) / (t * x0.size(1))   # (B,): divided by k
    return (per_seq * weight).mean()

# %% 11. Upgrade: Muon -----------------------------------------------------------------------------
# Changes: the optimizer of the blocks' weight matrices (section 6's demo uses AdamW for all).
# Why: AdamW scales each weight's step by that weight's own gradient history. Muon (K. Jordan,
# 2024) treats a matrix as a whole. It keeps a momentum of the gradients G, m = mu m + G, and steps
# along G + mu m (Nesterov momentum: the gradient plus where the momentum is going). Before the
# step it keeps that matrix's singular vectors and sets its singular values to about 1. The step
# then moves every direction that the matrix maps by about the same amount, not mostly the few
# directions where the gradient is large. Newton-Schulz does it without an SVD: scale the matrix so
# that its singular values are at most 1, then apply five times X <- a X + (b X X^T + c (X X^T)^2) X.
# Each round maps every singular value s to a s + b s^3 + c s^5. K. Jordan's coefficients (a, b, c)
# push them fast into a band around 1 (0.68 to 1.20 for a test matrix whose singular values span
# 100x), not onto 1 exactly: near enough for a step. An orthogonal step of an m x n matrix has
# entries of size about 1 / sqrt(max(m, n)); the factor 0.2 sqrt(max(m, n)) brings it to AdamW's
# typical step size, so one learning rate serves both. AdamW keeps the embedding (tied to the
# head), the time input, the adaLN layers, the gains and the biases.
# Measured: at equal wall time, 0.064 to 0.067 nats lower logged val than AdamW at its best swept
# learning rate (lab/README.md, "The faster learner"; AdamW: python lab/lab.py --recipe optimizer=adamw
# -- --train --max-iters 2000 --lr 2e-3).

def orthogonalize(G, steps=5, dtype=torch.float32):
    """G with its singular values moved near 1, for each matrix of a stack (..., m, n): Newton-Schulz in `dtype`."""
    tall = G.size(-2) > G.size(-1)               # iterate on the wide side: X X^T is the smaller one
    X = G.mT if tall else G
    X = (X / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)   # singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)

class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay, momentum=0.95, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype = ns_dtype                 # the iteration's precision: float32, or bfloat16

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group['lr'], group['momentum']
            by_shape = {}                        # one Newton-Schulz runs on each stack of same-shape matrices
            for p in group['params']:
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                buf = self.state[p]['momentum_buffer']
                buf.mul_(mu).add_(p.grad)                                        # m = mu m + G
                by_shape.setdefault(p.shape, []).append((p, p.grad + mu * buf))  # Nesterov: G + mu m
            for shape, pairs in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in pairs]), dtype=self.ns_dtype)
                for (p, _), o in zip(pairs, updates):
                    p.mul_(1 - lr * group['weight_decay'])
                    p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(shape)))

def make_optimizers(model, lr, weight_decay, kind='muon', ns_dtype=torch.float32, fused=False):
    """[Muon on the blocks' matrices, AdamW on the rest], or [AdamW on all]; decay on matrices only."""
    muon = [p for n, p in model.named_parameters()
            if kind == 'muon' and n.startswith('blocks.') and '.ada.' not in n and p.dim() == 2]
    rest = [p for p in model.parameters() if all(p is not q for q in muon)]
    groups = [{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused)
    return ([Muon(muon, lr, weight_decay, ns_dtype=ns_dtype)] if muon else []) + [adamw]

# The recipe that the command line trains both presets with: section 6's learning-rate schedule
# (warm up, hold, decay linearly over the last half), Muon, the cosine proposal, and the NELBO.
RECIPE = dict(min_lr=1e-4, warmup_iters=100, decay_frac=0.5, weight_decay=0.1, optimizer='muon',
              t_proposal='cosine', loss='nelbo')
LOSSES = {'nelbo': weighted_loss}   # RECIPE['loss'] picks one; the lab adds the pooled loss, 'naive'

# %% 12. Upgrade: temperature and nucleus --------------------------------------------------------
# Changes: how the sampler draws a character (section 7 draws from the plain softmax).
# Why: temperature divides the logits (below 1: safer text; 0: always the likeliest character),
# and the nucleus (top_p) draws only among the likeliest characters whose chances sum to top_p.
# The draw is Gumbel-max: argmax(logits - log(-log u)), u uniform, lands on each character with its
# softmax probability. (Zheng et al. 2024: float32 noise under-draws rare tokens of a large
# vocabulary; here a float32 u under-draws only characters below about 1e-7 probability.)
# Measured: the flags --temperature and --top-p (lab/README.md, "The samplers measured").

def propose(logits, temperature=1.0, top_p=1.0, generator=None):
    """A candidate per position, drawn from softmax(logits / temperature) within the nucleus, and its
    probability there: the confidence. Temperature 0: the argmax, scored at temperature 1. A temperature
    so small that the division overflows is temperature 0."""
    logits = logits.float()
    if temperature > 0 and not (logits / temperature).amax(-1).isfinite().all():
        temperature = 0.0
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1:    # drop a character once the surer ones already sum to top_p; the top one stays
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p                        # (..., V), sorted
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float('-inf'))
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        tokens = (logits - torch.log(-torch.log(u.clamp(min=1e-30)))).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    conf = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return tokens, conf

# %% 13. Upgrade: MDLM's coin per mask (--rule ancestral) ------------------------------------------
# Changes: how many characters a step reveals. MDLM's forward process flips a coin of chance t for
# each character, so its reverse, from t to s = t - 1/N, flips a coin for each hidden character:
# hidden at t, it was hidden at s with chance s / t, so it is revealed with chance (t - s) / t.
# On the step with N - i steps left that is 1 / (N - i); the last step reveals all.
# Why: it is the textbook sampler of MDLM's paper, "ancestral" because each step draws from the
# reverse process given the step before. A step reveals a random number of characters.
# Its bound: MDLM's NELBO for this linear schedule (a character is hidden with chance t) draws
# t ~ U(0, 1), hides each character with chance t, and weighs the window's summed cross-entropy by
# 1/t. Fix a count k. The chance that t hides exactly k is binom(L, k) t^k (1 - t)^(L - k);
# integrated against 1/t over t in [0, 1] it gives binom(L, k) Beta(k, L - k + 1) = 1/k. So for a
# model that ignores t, MDLM's bound per character is section 5's: the cost with k hidden, weighed
# 1/k (MDLM, eq. 10). A model told t gets two different valid bounds: MDLM's tells it the coin's t,
# section 5's tells it k / L. Section 5's is the one that training and --eval use.
# Measured: a baseline. Judged, it writes 3.81 bits/char at 64 steps, the default 2.41 (lab/README.md,
# "The samplers measured"): python lab/lab.py --frontier --judge out-gpt --num-samples 16 --length 128

def choose_coin(todo, n_reveal, logits, prob, steps_left, generator):
    """Each hidden position of todo (B, T) with chance 1 / steps_left; n_reveal is not used."""
    coin = torch.rand(todo.shape, generator=generator, device=todo.device)
    return todo & (coin < 1 / steps_left)

# %% 14. Upgrade: exact likelihoods, each beside its sampler ---------------------------------------
# Changes: what --eval --exact reports beside the bound.
# Why: section 5's random-order model reveals one character a step, in a random order. Let a rule
# choose the next position from the visible input only, and each string x has one path to it: the
# costs along that path sum to -log p(x) exactly, and the probabilities sum to 1 over all strings,
# as a GPT's do. (A rule that peeked at the hidden characters could pick the easy ones and report
# too low a cost.) Each rule is a sampler one can run, at temperature 1 and top_p 1:
#   left to right: --semi-ar 1 --steps 1 (blocks of one mask: a GPT inside the diffusion model);
#   surest first: --rule surest --semi-ar 0 --steps L, which reveals the hidden position whose
#     top probability is highest and draws its character from the model;
#   the bound: --rule random --semi-ar 0 --steps L, the random order that section 5 averages over.
# The default sampler (section 15) picks positions by the probability of randomly drawn candidates:
# its order is random, so its p(x) is an average over orders, and no exact figure is computed for it.
# The figures are on the first 20 of --eval's 100 val batches (640 windows), each window's bound
# averaged over 16 mask draws: so the bound here differs from section 9's (all 100 batches, one
# draw each). Each exact figure comes with its difference from the bound on the same windows.
# Measured: left to right 1.8512 and surest first 1.8457 against the bound's 1.8625, differences
# -0.0114 +- 0.0044 and -0.0168 +- 0.0050 (README.md): python mdlm.py --eval --exact

def surest(logp, masked):
    """(B,): the masked position whose prediction has the highest top probability."""
    return logp.amax(-1).masked_fill(~masked, float('-inf')).argmax(1)

def choose_surest(todo, n_reveal, logits, prob, steps_left, generator):
    """The n_reveal[b] hidden positions of row b whose predictions have the highest top probability."""
    return top_n(todo, logits.log_softmax(-1).amax(-1), n_reveal)

@torch.no_grad()
def exact_nll(model, x0, order=None):
    """-log p(x0) / L for each window (B,): each pass reveals where order(log-probs, masks) says
    (None: the leftmost mask), and pays -log p of the true character there."""
    (B, L), mask_id = x0.shape, model.config.vocab_size - 1
    x, rows, nll = torch.full_like(x0, mask_id), torch.arange(B, device=x0.device), 0
    for k in range(L, 0, -1):                                      # k masks left: told t = k / L
        logp = model(x, torch.full((B,), k / L, device=x0.device)).log_softmax(-1)   # (B, L, V)
        if order is None:
            i = (x == mask_id).float().argmax(1)                   # (B,) the leftmost mask
        else:
            i = order(logp, x == mask_id)
        nll = nll - logp[rows, i, x0[rows, i]]
        x[rows, i] = x0[rows, i]
    return nll / L

# %% 15. Upgrade: the confidence rule in semi-autoregressive blocks: the default sampler ----------
# Changes: which characters a step reveals, and in what order of blocks.
# Why: drawing many characters from one pass treats them as independent (section 7), and a small
# model's independent draws read as letter soup. Two fixes, each an argument of the same loop:
#   confidence (MaskGIT, LLaDA): reveal the candidates the model is surest of, by the probability
#     of the drawn character after temperature and top_p (LLaDA ranks by the plain softmax);
#   semi_ar = n (LLaDA's semi-autoregressive blocks): hand the loop only the first n masks of each
#     row, then the next n, each block a whole run of `steps` passes.
# With the default n = steps = 8, each pass reveals one character, inside a block of 8 that moves
# left to right. A trace on the tiny model: positions revealed, pass by pass, in the first blocks
#   block 1 (positions 0-7):   5, 0, 1, 2, 7, 3, 4, 6
#   block 2 (positions 8-15):  8, 14, 11, 9, 10, 13, 12, 15
#   block 3 (positions 16-23): 16, 17, 22, 19, 18, 20, 21, 23
# (python mdlm.py --sample from the default run, its first 24 passes).
# Measured: judged 2.41 bits/char at unigram entropy 4.04, against 3.88 for the random rule and 3.81
# for the coin at 64 steps, one model call per character (lab/README.md, "The samplers measured"):
# python lab/lab.py --frontier --judge out-gpt --num-samples 16 --length 128

def choose_confident(todo, n_reveal, logits, prob, steps_left, generator):
    """The n_reveal[b] hidden positions of row b whose drawn characters are the most probable."""
    return top_n(todo, prob, n_reveal)

RULES = {'random': choose_random, 'ancestral': choose_coin, 'surest': choose_surest,
         'confidence': choose_confident}

@dataclass
class SamplerConfig:             # how the command line writes text
    rule: str = 'confidence'     # one of RULES: which hidden characters a step reveals
    steps: int = 8               # model passes to fill one block
    semi_ar: int = 8             # blocks of this many hidden characters, left to right (0: one block)
    temperature: float = 1.0     # 0: always the likeliest character (section 12)
    top_p: float = 1.0           # draw only among the likeliest characters, whose chances sum to top_p

INFILL_TEMPERATURE = 0.0   # one fill of a blank is the model's best guess; several fills are drawn at 1

@torch.no_grad()
def generate(model, x, sampler=SamplerConfig(), generator=None, on_step=None):
    """Fill every [MASK] of x (B, T) with section 7's loop, block by block. Returns x."""
    if sampler.steps < 1 or sampler.semi_ar < 0:
        raise ValueError(f'a sampler needs steps >= 1 and semi_ar >= 0, got {sampler.steps} and {sampler.semi_ar}')
    mask_id = model.config.vocab_size - 1
    draw = lambda logits, g: propose(logits, sampler.temperature, sampler.top_p, g)
    while (x == mask_id).any():
        masked = x == mask_id
        block = masked                                                # semi_ar = 0: all the masks
        if sampler.semi_ar:
            block = masked & (masked.cumsum(1) <= sampler.semi_ar)     # the first semi_ar masks
        x = denoise(model, x, sampler.steps, generator, block, RULES[sampler.rule], draw, on_step)
    return x

# %% 16. The GPT twin: the yardstick ---------------------------------------------------------------
# The same network with causal=True and no time input is a GPT: it predicts the next character.
# Trained on the same steps, batch and context, and scored on the same windows, it tells what the
# freedom to write in any order costs; it is also the judge of the samplers' text (Part 2's
# opening). Its diff from the model of section 4:
#   the attention fills the upper triangle of its scores with -inf (is_causal in section 4's fused
#   call), so position i sees only positions <= i;
#   no time input; its input is the window shifted right by one, behind a start token.
# Measured: the README's results table (python mdlm.py --train --gpt; --eval --out-dir out-gpt).

def gpt_input(x0, start_id):
    """[start] + x0[:-1], with [MASK] as the start token. The GPT then predicts the same L characters
    as the diffusion model scores, and its mean cross-entropy is their exact NLL per character."""
    return torch.cat([torch.full_like(x0[:, :1], start_id), x0[:, :-1]], 1)

def gpt_batch(data, batch_size, block_size, start_id, generator):
    """(x0, its input): the GPT's training batch."""
    x0 = get_batch(data, batch_size, block_size, generator)
    return x0, gpt_input(x0, start_id)

def gpt_loss(model, x0, x):
    """The mean next-character cross-entropy: exactly -log p(x0) / L."""
    return F.cross_entropy(model(x, None).transpose(1, 2), x0)

@torch.no_grad()
def nll_per_seq(model, x0):
    """The GPT's exact negative log-likelihood for each window (B,), nats per character."""
    logits = model(gpt_input(x0, model.config.vocab_size - 1), None)
    return F.cross_entropy(logits.transpose(1, 2), x0, reduction='none').mean(1)

@torch.no_grad()
def gpt_generate(model, prefix, length, num_samples, temperature=1.0, top_p=1.0, generator=None):
    """The GPT's loop: `length` characters after `prefix` (ids), one pass each, in a sliding window
    of the start token and the last block_size - 1 characters, as in training."""
    L, start, device = model.config.block_size, model.config.vocab_size - 1, next(model.parameters()).device
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)   # (B, P)
    for _ in range(length):
        x = torch.cat([torch.full((num_samples, 1), start, device=device), out[:, -(L - 1):]], 1)
        tokens, _ = propose(model(x, None)[:, -1], temperature, top_p, generator)   # (B,) the next char
        out = torch.cat([out, tokens[:, None]], 1)
    return out

# %% 17. Text longer than the context --------------------------------------------------------------
# Changes: section 8 works inside one window of L characters; these write texts of any length.
# Completion: each window holds as much of the text so far as fits beside its masks, and at least
# half a window of it (the first window: the prompt's last L - 1 characters at most).
# Infilling: each blank is filled in the window of L centred on it, which holds the text around it.
# A blank wider than half a window is written in pieces of L / 2, the piece next to known text
# first, in a window that holds half a window of that text, as completion does: so no pass writes
# with nothing to read.

def generate_text(model, prefix, length, num_samples, sample):
    """`length` new characters after `prefix` (ids), in num_samples rows, one window at a time.
    For example, with L = 8, a prompt of 3 and length 10: the window [p p p _ _ _ _ _] writes 5, then
    [c c c c _ _ _ _] writes 4 (the last 4 of the 8 so far), then [c c c c c c c _] the last 1."""
    L, mask_id = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)   # (B, P)
    while out.size(1) < len(prefix) + length:
        keep = L - 1 if out.size(1) == len(prefix) else L - L // 2     # the text this window must hold
        n_new = min(len(prefix) + length - out.size(1), L - min(out.size(1), keep))
        context = out[:, max(0, out.size(1) - (L - n_new)):]           # all the text that fits
        masks = torch.full((num_samples, n_new), mask_id, device=device)
        window = sample(torch.cat([context, masks], 1))
        out = torch.cat([out, window[:, -n_new:]], 1)
    return out

def blank_window(start, end, n, L):
    """Where the window of L centred on the blank [start, end) of a text of n begins: inside the text,
    and at the blank's start at the latest."""
    return max(0, min((start + end - L) // 2, n - L, start))

def infill(model, ids, num_samples, sample):
    """Fill the [MASK]s of ids (a list, any length) in num_samples rows: (B, len(ids)), the first blank
    left first. Its window: centred on it when it is at most half a window wide (inside the text, and
    from its start at the latest); else its next L / 2 masks after the text before it; at the text's
    start, its last L / 2 masks before the text after it."""
    L, mask_id, n = model.config.block_size, model.config.vocab_size - 1, len(ids)
    half = L // 2
    x = torch.tensor(ids, device=next(model.parameters()).device).repeat(num_samples, 1)   # (B, n)
    while (x == mask_id).any():
        hidden = (x[0] == mask_id).long()           # the rows are copies: row 0's blanks
        start = hidden.argmax().item()              # the first mask left
        rest = hidden[start:]
        end = n                                     # the blank runs to the next clean character
        if (rest == 0).any():
            end = start + rest.argmin().item()
        if end - start <= half:                     # the whole blank, with the text around it
            lo = blank_window(start, end, n, L)
            hi = lo + L
        elif start > 0:                             # a piece after the text before it
            lo, hi = max(0, start - (L - half)), start + half
        else:                                       # a piece before the text after it
            lo, hi = end - half, end - half + L
        x[:, lo:hi] = sample(x[:, lo:hi])
    return x

# %% ========================== THE LESSON IS COMPLETE ==========================================
# Parts 1 and 2 are the lesson. Below is the harness a reader may skip, with its own imports: the data
# file, device and precision, checkpoints, resume, DDP, the logged training run, the command line.
# ================================================================================================
import argparse
import contextlib
import hashlib
import itertools
import re
import signal
import time
import types
from dataclasses import asdict, fields

from torch.nn.attention import SDPBackend, sdpa_kernel

MAX_CHARS = 1_000_000   # --num-samples x --length (or the --infill text) above this is refused before the work
MAX_PASSES = 10_000     # --steps and --eval-iters above this are refused: a typo, not a wish to wait for days
EVAL_BATCHES = 100      # --eval averages this many batches; the training log, the first eval_iters of them
EXACT_BATCHES = 20      # --eval --exact: the first 20 of them (block_size passes a window for each order)
EXACT_DRAWS = 16        # --eval --exact: the bound beside the exact figures averages 16 mask draws a window
GPT_DECAY_FRAC = 0.2    # the GPT twin decays its lr over the last 20% of its steps: over half, it overfits

# %% Harness: data file, device and precision ------------------------------------------------------

def load_text(path):
    """The UTF-8 text at `path`, or one line that says what is wrong with it."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f'no data file at {path}' if isinstance(e, FileNotFoundError) else f'{path} is not UTF-8 text'
                       if isinstance(e, UnicodeDecodeError) else f'cannot read {path}: {e.strerror}')
    if not text:
        raise CliError(f'{path} is empty')
    return text

def data_ref(path):
    """How a checkpoint names its text: relative to this file's folder when the text lies inside it
    (found again after the folder moves), else absolute."""
    try:
        rel = os.path.relpath(os.path.abspath(path), HERE)
    except ValueError:     # Windows: another drive than this file's
        return os.path.abspath(path)
    return os.path.abspath(path) if rel.startswith('..') else rel

def text_sha256(text):
    return hashlib.sha256(text.encode('utf-8')).hexdigest()

def checkpoint_text(ckpt, data=None):
    """The text a checkpoint was trained on, found by its path and checked by its hash; or --data's."""
    if data is not None:
        return load_text(data)
    path = os.path.join(HERE, ckpt['args'].get('data') or DEFAULT_DATA)   # an absolute path stays as it is
    if not os.path.exists(path):
        raise CliError(f'the text this model was trained on is gone from {path}: give it with --data FILE')
    text = load_text(path)
    sha = ckpt['args'].get('data_sha256')
    if sha and text_sha256(text) != sha:
        raise CliError(f'{path} has changed since this model was trained on it: give its text with --data FILE')
    return text

def splits(text, tok, block_size, fraction, device):
    """split_data on the device, the training split cut to its first `fraction` (--train-fraction)."""
    train_data, val_data = split_data(text, tok)
    if len(val_data) < block_size + 1:
        raise CliError(f'{len(train_data) + len(val_data)} characters are too few for block_size {block_size}: '
                       f'each split needs {block_size + 1}')
    n = int(fraction * len(train_data))
    if n < block_size + 1:
        raise CliError(f'--train-fraction {fraction:g} leaves {n} characters; a window needs {block_size + 1}')
    return train_data[:n].to(device), val_data.to(device)

def pick_device(requested=None):
    """--device if this machine has it, else the best there is: cuda, then mps, then cpu."""
    if requested:
        try:      # fails on a device this machine does not have, or on what is no device at all
            torch.empty(1, device=requested if requested.split(':')[0] in ('cpu', 'cuda', 'mps') else 'none')
        except (RuntimeError, AssertionError):      # AssertionError: a torch built without CUDA
            raise CliError(f'--device {requested} is not a device of this machine: use cpu, cuda, cuda:N or mps')
        return requested
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'

def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively (x86 avx512_bf16 or AMX); elsewhere it is emulated, slow."""
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:   # not Linux: no claim, float32
        return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', f.read()))
    return False

@contextlib.contextmanager
def bf16_autocast(kind):
    """bf16 autocast; on a CPU also PyTorch's math attention kernel, the plain formula, which took 0.70x
    the fused kernel's time there (lab/README.md, the bench)."""
    with torch.autocast(device_type=kind, dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.MATH) if kind == 'cpu' else contextlib.nullcontext():
            yield

def resolve_dtype(device, dtype='auto'):
    """--dtype auto: 'bfloat16' where the hardware computes bf16 natively, else 'float32'."""
    if dtype != 'auto':
        return dtype
    kind = device.split(':')[0]
    if kind == 'cuda':   # native bf16 from compute capability 8.0 (A100, RTX 30xx) on; a T4 or V100 emulates it
        return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float32'
    return 'bfloat16' if kind == 'cpu' and cpu_has_bf16() else 'float32'

def autocast_for(device, dtype='auto'):
    """bf16 autocast where resolve_dtype says bfloat16, else float32: a null context."""
    if resolve_dtype(device, dtype) == 'bfloat16':
        return lambda: bf16_autocast(device.split(':')[0])
    return contextlib.nullcontext

def in_precision(loss_fn, autocast):
    """loss_fn with its forward pass and loss inside `autocast`, the run's precision (train_step's backward
    and update stay outside it)."""
    def loss_in_precision(model, *batch):
        with autocast():
            return loss_fn(model, *batch)
    return loss_in_precision

@contextlib.contextmanager
def true_float32():
    """TF32 off: on a GPU, evaluation's matmuls in float32 itself, as the training log says."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

@contextlib.contextmanager
def reporting(model, what, total=None, every=5.0):
    """Every `every` seconds of a long wait, one line on stderr: how many model passes `what` has made."""
    count, last = [0], [time.time()]
    def hook(module, inputs):
        count[0] += 1
        if time.time() - last[0] >= every:
            last[0] = time.time()
            print(f'{what}: {count[0]:,}{f" of {total:,}" if total else ""} model passes', file=sys.stderr, flush=True)
    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()

# %% Harness: checkpoints, resume, DDP -------------------------------------------------------------

FORMAT = 'mdlm-4'
ARCH_FLAGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'use_time', 'causal')   # fixed by a checkpoint
TRAIN_FLAGS = ('batch_size', 'max_iters', 'lr', 'eval_interval', 'eval_iters', 'train_fraction', 'dtype', *RECIPE)

def save_checkpoint(path, ckpt):
    """Write path.tmp, fsync, rename it over `path`: a crash leaves the old or the new, never half of one."""
    with open(path + '.tmp', 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)
    with contextlib.suppress(OSError):   # make the rename itself durable
        d = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        os.fsync(d)
        os.close(d)

def load_checkpoint(path):
    """Load with weights_only=True: tensors and plain values only, so a hostile file cannot run code."""
    out_dir = os.path.dirname(path)
    if not os.path.exists(path):
        flag = '' if out_dir == 'out' else f' --out-dir {out_dir}'
        raise CliError(f'no checkpoint at {path}; train one with: python mdlm.py --train{flag}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        with open(path, 'rb') as f:     # torch.save writes a zip file
            reason = (str(e).strip() or type(e).__name__).splitlines()[0] if f.read(2) == b'PK' else \
                'not a file that torch.save wrote'
        best = os.path.join(out_dir, 'best', 'ckpt.pt')
        hint = f'; try its best checkpoint: --out-dir {os.path.dirname(best)}' if os.path.isfile(best) else \
            f'; train again with: python mdlm.py --train --overwrite --out-dir {out_dir}'
        raise CliError(f'{path} is not a loadable checkpoint ({reason}){hint}')
    fmt = ckpt.get('format') if isinstance(ckpt, dict) else None
    if isinstance(fmt, str) and fmt.startswith('mdlm-') and fmt != FORMAT:   # the same weights, another network
        raise CliError(f'{path} was saved by an earlier mdlm.py ({fmt}; this one reads {FORMAT}): train it again')
    keys = {'model', 'optimizer', 'config', 'vocab', 'iter', 'best_val', 'args', 'rng'}
    if fmt != FORMAT or not keys <= ckpt.keys() or not isinstance(ckpt['args'], dict):
        raise CliError(f'{path} is not an mdlm checkpoint')
    return ckpt

def load_model(out_dir, device='cpu'):
    """The model and tokenizer of <out_dir>/ckpt.pt, and the checkpoint."""
    if os.path.isfile(out_dir):
        raise CliError(f'--out-dir {out_dir} is a file: give the folder that holds ckpt.pt')
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    try:
        model, tok = MDLM(ModelConfig(**ckpt['config'])), Tokenizer(ckpt['vocab'])
        model.load_state_dict(ckpt['model'])
        assert tok.vocab_size == model.config.vocab_size, 'vocabulary and model disagree'
    except Exception as e:
        raise CliError(f'the checkpoint does not hold a valid mdlm model ({type(e).__name__})')
    print(f'loaded {out_dir}/ckpt.pt: step {ckpt["iter"]}, {model.num_params() / 1e6:.2f}M parameters, {device}',
          file=sys.stderr)
    return model.to(device).eval(), tok, ckpt

def resume_config(ckpt, args):
    """--resume: the saved architecture (another is refused) and the saved training settings not given again."""
    config, changed = ModelConfig(**ckpt['config']), []
    for name in ARCH_FLAGS:
        if name in args.explicit and getattr(args, name) != getattr(config, name):
            raise CliError(f'cannot resume with {name} {getattr(args, name)}: the run has {getattr(config, name)}')
        setattr(args, name, getattr(config, name))    # the run's args, saved with it, say what it is
    for name in TRAIN_FLAGS:
        if name not in ckpt['args']:
            raise CliError(f'the checkpoint predates the setting {name}: train it again')
        if name not in args.explicit:
            setattr(args, name, ckpt['args'][name])
        elif getattr(args, name) != ckpt['args'][name]:
            changed.append(f'{name}: {ckpt["args"][name]} -> {getattr(args, name)}')
    if 'dropout' in args.explicit and args.dropout != config.dropout:
        changed.append(f'dropout: {config.dropout} -> {args.dropout}')
        config.dropout = args.dropout
    return config, changed

def restore_state(ckpt, run, args):
    if not ckpt['optimizer']:         # pretrained/: the weights alone
        raise CliError(f'{run.ckpt_path} holds weights only, without the optimizer state that --resume needs: '
                       f'it samples, completes, fills and evaluates')
    run.model.load_state_dict(ckpt['model'])
    try:
        assert len(ckpt['optimizer']) == len(run.optimizers)
        [opt.load_state_dict(state) for opt, state in zip(run.optimizers, ckpt['optimizer'])]
        run.gen.set_state(ckpt['rng']['gen'])
        torch.set_rng_state(ckpt['rng']['torch'])
        if run.device.startswith('cuda') and ckpt['rng'].get('cuda') is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
    except (AssertionError, TypeError, ValueError, KeyError, RuntimeError):
        raise CliError(f'the checkpoint\'s optimizer state does not fit its optimizer, {args.optimizer}: '
                       f'resume as it was trained')
    if run.world > 1:    # only rank 0's dropout RNG was saved: give the other ranks their own again
        torch.manual_seed(args.seed + run.rank + 1_000_003 * ckpt['iter'])
    run.it, run.best_val = ckpt['iter'], ckpt['best_val']

def ddp_setup(device_arg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per device, nanoGPT style."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return 0, 1, pick_device(device_arg)
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    device = f'cuda:{local}' if (device_arg or 'cuda').startswith('cuda') and torch.cuda.is_available() else 'cpu'
    if device != 'cpu':
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend='gloo' if device == 'cpu' else 'nccl')
    return rank, world, device

def rank_rows(batch, rank, world):
    """This rank's rows of a global batch: every world-th row, so that each rank's rows spread over
    the whole stratified range of k (a contiguous slice would hold only a narrow band of it)."""
    return tuple(a[rank::world] for a in batch)

def any_rank(flag, device, world):
    """True on every rank when `flag` is true on any (so all ranks stop at the same step)."""
    if world == 1:
        return bool(flag)
    f = torch.tensor([float(bool(flag))], device=device)
    torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MAX)
    return f.item() > 0

# %% Harness: the training run ---------------------------------------------------------------------
# train_step in a loop, with what a long run needs: evals logged to <out-dir>/log.csv, saves, Ctrl-C, --resume.

def check_out_dir(args, ckpt_path):
    """Before any work: the out-dir is a folder this process can write (made if need be), its ckpt.pt
    a file, and a run already there is not lost to a second --train."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise CliError(f'--out-dir {args.out_dir} is a file, not a folder')
    if os.path.exists(ckpt_path) and not os.path.isfile(ckpt_path):
        raise CliError(f'{ckpt_path} is not a file: move it away, or train into another --out-dir')
    if args.resume and not os.path.exists(ckpt_path):
        load_checkpoint(ckpt_path)                 # its one line: no checkpoint there, and how to train one
    if os.path.exists(ckpt_path) and not args.resume and not args.overwrite:
        raise CliError(f'{ckpt_path} holds a run: continue it with --resume, or start over, replacing it, '
                       f'with --overwrite (or train into another --out-dir)')
    made = not os.path.exists(args.out_dir)
    probe = os.path.join(args.out_dir, f'.probe-{os.getpid()}')
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(args.out_dir)
        raise CliError(f'cannot write to --out-dir {args.out_dir}: {e.strerror}')

def trim_log(out_dir, step):
    """--resume: drop log.csv's rows after the checkpoint's step (a run killed between its log line and its save)."""
    path = os.path.join(out_dir, 'log.csv')
    if os.path.isfile(path):
        with open(path) as f:
            rows = f.read().splitlines(keepends=True)
        kept = rows[:1] + [r for r in rows[1:] if r.split(',')[0].isdigit() and int(r.split(',')[0]) <= step]
        if kept != rows:
            with open(path, 'w') as f:
                f.writelines(kept)

def start_run(args):
    """Everything a run needs, fresh or resumed from <out-dir>/ckpt.pt: a namespace."""
    run = types.SimpleNamespace(started=time.time(), it=0, best_val=float('inf'), evaluating=False,
                                ckpt_path=os.path.join(args.out_dir, 'ckpt.pt'),
                                best_path=os.path.join(args.out_dir, 'best', 'ckpt.pt'))
    run.rank, run.world, device = ddp_setup(args.device)
    run.device = device
    run.log = (lambda *a: print(*a, flush=True)) if run.rank == 0 else (lambda *a: None)
    resolve(args, device)
    check_out_dir(args, run.ckpt_path)
    # 1) the shape and the training settings: from the preset, or a resumed run's from its checkpoint
    ckpt = load_checkpoint(run.ckpt_path) if args.resume else None
    if ckpt:
        config, changed = resume_config(ckpt, args)
        text = checkpoint_text(ckpt, args.data)
        run.data = ckpt['args']['data'] if args.data is None else data_ref(args.data)
    else:
        text = load_text(args.data or DEFAULT_DATA)
        run.data = data_ref(args.data or DEFAULT_DATA)
    run.data_sha256 = text_sha256(text)
    run.tok = Tokenizer(ckpt['vocab'] if ckpt else sorted(set(text)))
    run.config = config if ckpt else ModelConfig(vocab_size=run.tok.vocab_size, dropout=args.dropout,
                                                 **{k: getattr(args, k) for k in ARCH_FLAGS})
    # 2) data: the whole token tensor lives on the device (1.1M chars: a few MB), no loader needed
    run.train_data, run.val_data = splits(text, run.tok, run.config.block_size, args.train_fraction, device)
    # 3) model, optimizers, and one generator for batches and noise: every rank draws the same global
    # batch and noise and keeps its slice, so N ranks see exactly one process's N-times larger batch
    torch.manual_seed(args.seed + run.rank)  # dropout differs per rank; data and noise do not
    run.model = MDLM(run.config).to(device)  # what gets saved: never the DDP-wrapped one
    args.dtype = resolve_dtype(device, args.dtype or 'auto')   # saved as what it is: bfloat16 or float32
    run.autocast = autocast_for(device, args.dtype)
    bf16 = args.dtype == 'bfloat16'                      # then Muon's Newton-Schulz runs in bf16 too
    run.optimizers = make_optimizers(run.model, args.lr, args.weight_decay, args.optimizer,
                                     torch.bfloat16 if bf16 else torch.float32, fused=device.startswith('cuda'))
    run.gen = torch.Generator().manual_seed(args.seed)   # on the CPU: the same batches on every device
    if ckpt:
        restore_state(ckpt, run, args)
        if run.rank == 0:
            trim_log(args.out_dir, run.it)
        run.log(f'resuming from {run.ckpt_path} at step {run.it}' + (f' ({", ".join(changed)})' if changed else ''))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # on a GPU: fast, ~fp32 matmuls
    run.step_model = run.model if run.world == 1 else torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[device] if device.startswith('cuda') else None)
    run.log(f'device {device}{f" x {run.world}" if run.world > 1 else ""} | {"bf16 autocast" if bf16 else "float32"}'
            f' (evals in float32) | preset {"from checkpoint" if ckpt else args.preset} | {len(run.train_data):,} '
            f'training chars | {run.model.num_params() / 1e6:.2f}M parameters | {asdict(run.config)}')
    return run, ckpt

def check_finite(run, loss):
    """A non-finite loss or weight ends the run on every rank at once, before anything is saved:
    the last good checkpoint stays."""
    bad = loss is not None and not math.isfinite(loss.item())
    bad = bad or not torch.stack([p.isfinite().all() for p in run.model.parameters()]).all().item()   # one sync
    if any_rank(bad, run.device, run.world):
        raise CliError(f'the loss or the weights are not finite at step {run.it}; '
                       f'kept the last good checkpoint {run.ckpt_path}')

def save_run(run, args, path=None):
    """The whole state at <out-dir>/ckpt.pt, or at `path` (the best checkpoint)."""
    if run.rank == 0:
        path = path or run.ckpt_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, {
            'format': FORMAT, 'model': run.model.state_dict(), 'config': asdict(run.config), 'vocab': run.tok.itos,
            'optimizer': [opt.state_dict() for opt in run.optimizers], 'iter': run.it, 'best_val': run.best_val,
            'args': {**{k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
                     'data': run.data, 'data_sha256': run.data_sha256},
            'rng': {'gen': run.gen.get_state(), 'torch': torch.get_rng_state(),
                    'cuda': torch.cuda.get_rng_state() if run.device.startswith('cuda') else None}})

class EvalCut(Exception):
    """Ctrl-C during an evaluation: the evaluation stops at once; the step's weights are saved."""

def show_sample(run):
    """One line of the model's writing, the default sampler on its own seeded generator (the run's
    figures do not move): a learner watches the model learn to write."""
    was_training = run.model.training
    run.model.eval()
    g = torch.Generator(device=run.device).manual_seed(SEED)
    L, mask_id = min(64, run.config.block_size), run.tok.mask_id
    if run.config.causal:
        out = gpt_generate(run.model, [], L, 1, generator=g)
    else:
        out = generate(run.model, torch.full((1, L), mask_id, device=run.device), SamplerConfig(), g)
    run.model.train(was_training)
    run.log(f'sample | {run.tok.decode(out[0].tolist())}'.replace('\n', '\u21b5'))

def evaluate_and_save(run, args, fresh):
    """Score, log to log.csv, save; a new best val to <out-dir>/best/ too: a run that overfits keeps its best."""
    per_seq = nll_per_seq if run.config.causal else None
    run.evaluating = True                   # Ctrl-C now cuts the evaluation short
    with true_float32():
        train_loss, _ = estimate_loss(run.model, run.train_data, args.eval_iters, args.batch_size, per_seq=per_seq)
        val_loss, val_se = estimate_loss(run.model, run.val_data, args.eval_iters, args.batch_size, per_seq=per_seq)
    run.evaluating = False
    improved, run.best_val = val_loss < run.best_val, min(run.best_val, val_loss)
    name, seconds = 'nll' if run.config.causal else 'nelbo', time.time() - run.started
    run.log(f'step {run.it} | train {name} {train_loss:.4f} | val {name} {val_loss:.4f} +- {val_se:.4f} '
            f'nats/char ({val_loss / math.log(2):.4f} bits/char) | {seconds:.0f}s')
    if run.rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        log_path = os.path.join(args.out_dir, 'log.csv')
        fresh = fresh or not os.path.exists(log_path)
        with open(log_path, 'w' if fresh else 'a') as f:
            f.write('step,train_loss,val_loss,val_se,seconds\n' * fresh
                    + f'{run.it},{train_loss:.5f},{val_loss:.5f},{val_se:.5f},{seconds:.1f}\n')
    if improved:     # best first: a crash between the two saves leaves a ckpt.pt that will find it again
        save_run(run, args, run.best_path)
    save_run(run, args)
    if run.rank == 0:
        show_sample(run)

def evals_left(run, args):
    """How many evaluations the steps after run.it hold (every eval_interval, and the last step)."""
    every = args.eval_interval
    return args.max_iters // every - run.it // every + bool(args.max_iters % every)

def on_signal(run, args, stop):
    """Ctrl-C or SIGTERM: the first finishes the step (or cuts an evaluation short), saves and exits;
    a second exits at once, and the checkpoint saved last stays as it was."""
    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if run.rank == 0:
            print(f'\nstopping: saving the weights to {run.ckpt_path}, then exiting (again: exit now, '
                  f'keeping the checkpoint saved last)', file=sys.stderr, flush=True)
        if run.evaluating:
            raise EvalCut
    return handler

def train(args):
    run, ckpt = start_run(args)
    stop = []    # Ctrl-C / SIGTERM raise a flag: the step in flight finishes, then we save and stop
    old_handlers = {s: signal.signal(s, on_signal(run, args, stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    B, T, rank, world, causal = args.batch_size, run.config.block_size, run.rank, run.world, run.config.causal
    start_it, loss, log_every, eval_seconds = run.it, None, max(1, args.eval_interval // 5), 0.0
    step_loss = in_precision(gpt_loss if causal else LOSSES[args.loss], run.autocast)
    tic, tic_it = time.time(), run.it       # step timing restarts after each eval: ms/step is training alone
    try:
        while True:
            # 1) evaluate and checkpoint (not again at the step a resumed run starts from); stop when asked
            if (run.it % args.eval_interval == 0 or run.it == args.max_iters) and not (ckpt and run.it == start_it):
                check_finite(run, loss)
                eval_start = time.time()
                with contextlib.suppress(EvalCut):
                    evaluate_and_save(run, args, fresh=not ckpt and run.it == 0)
                eval_seconds = time.time() - eval_start
                tic, tic_it = time.time(), run.it
            if run.it >= args.max_iters:
                break
            if (world == 1 or run.it % 10 == 0) and any_rank(stop, run.device, world):
                check_finite(run, loss)
                save_run(run, args)
                again = ''.join(f' --{name.replace("_", "-")} {getattr(args, name)}' for name in ('out_dir', 'device')
                                if name in args.explicit)   # --data and the settings: kept in the checkpoint
                if rank == 0:
                    print(f'stopped at step {run.it}; saved {run.ckpt_path}. Resume with: python mdlm.py --train '
                          f'--resume{again}', file=sys.stderr, flush=True)
                raise SystemExit(130)
            # 2) one step: world * B rows with t stratified over all of them, this rank's B of them
            if causal:
                batch = gpt_batch(run.train_data, world * B, T, run.tok.mask_id, run.gen)
            else:
                batch = weighted_batch(run.train_data, world * B, T, run.tok.mask_id, run.gen,
                                       PROPOSALS[args.t_proposal])
            batch = rank_rows(batch, rank, world)
            lr = get_lr(run.it, args.lr, args.min_lr, args.warmup_iters, args.max_iters, args.decay_frac)
            loss = train_step(run.step_model, run.optimizers, batch, lr, step_loss)
            run.it += 1
            if run.it % log_every == 0 or run.it in (1, 10) or run.it == args.max_iters:   # the only host syncs
                check_finite(run, loss)
                dt = (time.time() - tic) / (run.it - tic_it)
                eta = dt * (args.max_iters - run.it) + eval_seconds * evals_left(run, args)
                run.log(f'step {run.it} | loss {loss.item():.4f} | lr {lr:.1e} | {dt * 1000:.1f}ms | '
                        f'{B * T * world / dt:,.0f} tok/s | eta {eta:.0f}s')
        run.log(f'done: best val {"nll" if causal else "nelbo"} {run.best_val:.4f} nats/char (saved in '
                f'{run.best_path if os.path.exists(run.best_path) else "none"}); latest checkpoint: {run.ckpt_path}')
        return run.best_val
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1:
            torch.distributed.destroy_process_group()

# %% Harness: generation and evaluation from the command line --------------------------------------

def parse_infill(text, tok):
    """'To [___] or not' -> ids with as many [MASK]s as the blank is wide, brackets included, so the answer
    lines up under it; '[N]' is a blank of N characters (N >= 1), for blanks narrower than [_]'s 3."""
    parts = re.split(r'(\[_+\]|\[[0-9]+\])', text)      # text, blank, text, ..., blank, text
    ids = []
    for n, part in enumerate(parts):
        if n % 2 == 0:
            ids += tok.encode(part)
        elif '_' in part:
            ids += [tok.mask_id] * len(part)
        elif len(part) > 11 or len(ids) + int(part[1:-1]) > MAX_CHARS:   # sized before any list is built
            shown = part if len(part) <= 16 else part[:11] + '...]'
            raise CliError(f'the blank {shown} makes the text longer than {MAX_CHARS:,} characters: narrow it')
        elif int(part[1:-1]) >= 1:
            ids += [tok.mask_id] * int(part[1:-1])
        else:
            raise CliError(f'{part} is a blank of no characters: write [1] or wider')
    if tok.mask_id not in ids:
        raise CliError('the text has no blank to fill: mark one with [___] (as wide as the marker) '
                       'or [N] (N characters)')
    return ids

def sampler_from_args(args, infill=False):
    """SamplerConfig with the flags given; one fill of a blank takes INFILL_TEMPERATURE (the best guess)."""
    chosen = {f.name: getattr(args, f.name) for f in fields(SamplerConfig) if getattr(args, f.name) is not None}
    if infill and (args.num_samples or 1) == 1:
        chosen.setdefault('temperature', INFILL_TEMPERATURE)
    return SamplerConfig(**chosen)

def run_generation(args):
    model, tok, _ = load_model(args.out_dir, pick_device(args.device))
    T, device = model.config.block_size, next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(args.seed)
    sampler = sampler_from_args(args, infill=args.infill is not None)
    def on_step(x, frame=itertools.count(1)):    # --show: each step's rows on stderr, newlines drawn as arrows
        n = next(frame)
        print('\n'.join(f'step {n:4d} | {tok.decode(row.tolist())}'.replace('\n', '\u21b5') for row in x),
              file=sys.stderr, flush=True)
    if model.config.causal and args.infill is not None:
        raise CliError('a GPT writes left to right, one character a pass: it cannot fill blanks')
    for name in ('rule', 'steps', 'semi_ar', 'show'):
        if model.config.causal and name in args.explicit:
            raise CliError(f'--{name.replace("_", "-")} is for a diffusion model: this GPT writes left to right, '
                           f'one character a pass')
    if args.complete is not None and not args.complete:
        raise CliError('the prompt is empty: give some text to continue, or use --sample')
    ids = parse_infill(args.infill, tok) if args.infill is not None else tok.encode(args.complete or '')
    n = args.num_samples
    if args.infill is not None and n * len(ids) > MAX_CHARS:
        raise CliError(f'{n} copies of a text of {len(ids):,} characters (its blanks included) are more than '
                       f'{MAX_CHARS:,} characters in all: ask for fewer (--num-samples)')
    if args.infill is None and n * (args.length or T) > MAX_CHARS:
        raise CliError(f'{n} sample{"s" * (n > 1)} of {args.length or T:,} characters are more than '
                       f'{MAX_CHARS:,} characters in all: ask for fewer (--num-samples, --length)')
    sample = lambda x: generate(model, x, sampler, g, on_step if args.show else None)
    with reporting(model, 'writing'):
        if args.infill is not None:
            out = infill(model, ids, n, sample)
        elif model.config.causal:          # a GPT slides over any prompt
            out = gpt_generate(model, ids, args.length or T, n, sampler.temperature, sampler.top_p, g)
        else:
            if len(ids) >= T:
                print(f'the prompt is {len(ids)} characters, the context {T}: the model sees the last {T - 1} of it',
                      file=sys.stderr)
            out = generate_text(model, ids, args.length or T, n, sample)
    sys.stdout.write(('\n' + '=' * 40 + '\n').join(tok.decode(row.tolist()) for row in out) + '\n')
    return 0

def run_eval(args):
    """The bound (a GPT: its exact NLL) on val and train; --exact: two exact likelihoods beside the bound."""
    model, tok, ckpt = load_model(args.out_dir, pick_device(args.device))
    device, causal = next(model.parameters()).device, model.config.causal
    fraction = ckpt['args']['train_fraction']     # the train figure: the text it trained on
    train_data, val_data = splits(checkpoint_text(ckpt, args.data), tok, model.config.block_size, fraction, device)
    n, B = args.eval_iters or EVAL_BATCHES, args.batch_size or ckpt['args']['batch_size']   # as in training
    per_seq = nll_per_seq if causal else None
    if causal and args.exact:
        raise CliError('--exact adds exact likelihoods to a diffusion model\'s bound: a GPT\'s --eval is exact already')
    for name, data in (('val', val_data), (f'train{f" (its first {fraction:g})" if fraction < 1 else ""}', train_data)):
        with true_float32(), reporting(model, f'--eval, {name}', total=n):
            mean, se = estimate_loss(model, data, n, B, per_seq=per_seq)
        what = ('nll', f'perplexity {math.exp(mean):.3f} (exact: a GPT\'s likelihood)') if causal \
            else ('nelbo', f'perplexity <= {math.exp(mean):.3f} (an upper bound: the NELBO bounds -log p)')
        print(f'{name} {what[0]}: {mean:.4f} nats/char ({mean / math.log(2):.4f} bits/char) +- {se:.4f} (standard '
              f'error, {n} batches of {B} windows of {model.config.block_size}); {what[1]}')
    if args.exact:
        with true_float32():
            exact_figures(model, val_data, min(n, EXACT_BATCHES), B)
    return 0

def exact_figures(model, val_data, m, B):
    """--exact: on m batches, the bound (EXACT_DRAWS mask draws a window) and two exact likelihoods, each
    with its difference from the bound on the same windows and that difference's standard error."""
    L = model.config.block_size
    print(f'val, the first {m} of those batches ({m * B} windows): the bound and two exact likelihoods, '
          f'each of the sampler named after it')
    noise, bounds = torch.Generator().manual_seed(EVAL_SEED + 1), []
    def bound(model, x0):                   # (B,): the mean of EXACT_DRAWS draws of the NELBO's masks
        bounds.append(torch.stack([nelbo_per_seq(model, x0, noise) for _ in range(EXACT_DRAWS)]).mean(0))
        return bounds[-1]
    with reporting(model, '--exact, the bound', total=m * EXACT_DRAWS):
        mean, se = estimate_loss(model, val_data, m, B, per_seq=bound)
    print(f'  {"nelbo (bound)":<22} {mean:.4f} +- {se:.4f} nats/char ({mean / math.log(2):.4f} bits/char)  '
          f'--rule random --semi-ar 0 --steps {L}')
    for name, order, sampler in (('exact, left to right', None, '--rule random --semi-ar 1 --steps 1'),
                                 ('exact, surest first', surest, f'--rule surest --semi-ar 0 --steps {L}')):
        gaps = []                           # per batch: the mean of exact - bound over its windows
        def exact(model, x0):
            nll = exact_nll(model, x0, order)
            gaps.append((nll - bounds[len(gaps)]).mean())
            return nll
        with reporting(model, f'--exact, {name}', total=m * L):
            mean, se = estimate_loss(model, val_data, m, B, per_seq=exact)
        gap = torch.stack(gaps)
        gap_se = (gap.std() / math.sqrt(m)).item() if m > 1 else float('nan')
        print(f'  {name:<22} {mean:.4f} +- {se:.4f} nats/char ({mean / math.log(2):.4f} bits/char); minus the bound: '
              f'{gap.mean().item():+.4f} +- {gap_se:.4f}  {sampler}')

# %% Harness: the command line ---------------------------------------------------------------------

def checked(kind, ok, what):
    """An argparse type: a finite `kind` for which ok(value) holds, else argparse's one-line error."""
    def parse(s):
        v = kind(s)
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f'must be {what}, got {s}')
        return v
    parse.__name__ = kind.__name__   # argparse names the type in its "invalid int value" message
    return parse

POSITIVE, NONNEG = checked(int, lambda v: v >= 1, 'at least 1'), checked(int, lambda v: v >= 0, 'at least 0')
UNIT = checked(float, lambda v: 0 < v <= 1, 'in (0, 1]')
PASSES = checked(int, lambda v: 1 <= v <= MAX_PASSES, f'in 1..{MAX_PASSES:,}')

# The flags each mode reads; any other is refused. Every mode takes --out-dir, --device, --dtype, --seed.
SAMPLING = {'rule', 'steps', 'semi_ar', 'temperature', 'top_p', 'num_samples', 'length', 'show'}
MODE_FLAGS = {'train': {'preset', 'n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'eval_interval',
                        'dropout', 'use_time', 'causal', 'max_iters', 'eval_iters', 'lr', 'train_fraction', 'resume',
                        'overwrite', 'data'},
              'eval': {'exact', 'batch_size', 'eval_iters', 'data'},
              'sample': SAMPLING, 'complete': SAMPLING, 'infill': SAMPLING - {'length'}}
FLAG_NAMES = {'use_time': 'no-time', 'causal': 'gpt'}

def refuse_unused_flags(args):
    """One line for a flag that the mode would ignore, naming the modes that read it."""
    mode = next(m for m in MODE_FLAGS if getattr(args, m) not in (None, False))
    for name in sorted(args.explicit - set(MODE_FLAGS) - {'out_dir', 'device', 'dtype', 'seed'}):
        if name not in MODE_FLAGS[mode]:
            users = ', '.join(f'--{m}' for m in MODE_FLAGS if name in MODE_FLAGS[m])
            flag = FLAG_NAMES.get(name, name.replace('_', '-'))
            raise CliError(f'--{flag} does nothing with --{mode}: it is for {users}')

def build_parser():
    S = SamplerConfig()
    p = argparse.ArgumentParser(description='A masked diffusion language model, in one file.', allow_abbrev=False)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument('--train', action='store_true', help='train (or --resume) a model (--gpt: the GPT twin)')
    mode.add_argument('--sample', action='store_true', help='generate text from pure noise')
    mode.add_argument('--complete', metavar='PROMPT', help='continue a prompt')
    mode.add_argument('--infill', metavar='TEXT', help='fill the blanks [___] of a text, each as wide as its marker')
    mode.add_argument('--eval', action='store_true', help='the NELBO bound (a GPT: its exact NLL) on the val split')
    p.add_argument('--exact', action='store_true', default=None, help='with --eval: two exact likelihoods too (slow)')
    p.add_argument('--preset', choices=['auto', *PRESETS], help='auto (the default): base on cuda, else tiny')
    for name in ('--n-layer', '--n-head', '--n-embd', '--block-size', '--batch-size', '--eval-interval'):
        p.add_argument(name, type=POSITIVE, help='default: from --preset')
    p.add_argument('--dropout', type=checked(float, lambda v: 0 <= v < 1, 'in [0, 1)'))
    p.add_argument('--no-time', dest='use_time', action='store_false', default=None, help='no adaLN: t is not told')
    p.add_argument('--gpt', dest='causal', action='store_true', default=None, help='--train the GPT twin (out-gpt/)')
    p.add_argument('--max-iters', type=NONNEG, help='0: build, evaluate, save')
    p.add_argument('--eval-iters', type=PASSES, help=f'batches per loss estimate (--eval: {EVAL_BATCHES}; '
                                                     f'at most {MAX_PASSES:,})')
    p.add_argument('--lr', type=checked(float, lambda v: v > 0, 'above 0'))
    p.add_argument('--train-fraction', type=UNIT, metavar='F', help='train on the first F of the training split')
    p.add_argument('--resume', action='store_true', default=None, help='continue from <out-dir>/ckpt.pt')
    p.add_argument('--overwrite', action='store_true', default=None, help='start over, replacing <out-dir>/ckpt.pt')
    p.add_argument('--rule', choices=list(RULES), help=f'which masks a step reveals ({S.rule})')
    p.add_argument('--steps', type=PASSES, help=f'denoising steps per block ({S.steps}; at most {MAX_PASSES:,})')
    p.add_argument('--semi-ar', type=NONNEG, metavar='N', help=f'blocks of N masks, left to right ({S.semi_ar}; 0 off)')
    p.add_argument('--temperature', type=checked(float, lambda v: v >= 0, 'at least 0'), help='0: argmax')
    p.add_argument('--top-p', type=UNIT, help=f'nucleus sampling ({S.top_p:g}: all)')
    p.add_argument('--num-samples', type=POSITIVE, help='default: 1')
    p.add_argument('--length', type=POSITIVE, help='characters to generate (default: block_size)')
    p.add_argument('--show', action='store_true', default=None, help='watch the denoising, step by step')
    p.add_argument('--data', help='UTF-8 text (--train: input.txt, Tiny Shakespeare; other modes: the checkpoint\'s)')
    p.add_argument('--out-dir', help='where the checkpoint lives (default out/; out-gpt/ for --train --gpt)')
    p.add_argument('--device', help='cuda, mps or cpu (default: the best available)')
    p.add_argument('--dtype', choices=['auto', 'float32', 'bfloat16'], help='auto: bf16 where native')
    p.add_argument('--seed', type=checked(int, lambda v: 0 <= v < 2 ** 63, 'in [0, 2**63)'), default=SEED)
    return p

def resolve(args, device):
    """Fill the training flags left unset from the preset and RECIPE: one recipe on every machine."""
    if args.preset in (None, 'auto'):
        args.preset = 'base' if device.startswith('cuda') else 'tiny'
    values = {**RECIPE, **PRESETS[args.preset], 'train_fraction': 1.0}
    if args.dtype == 'auto':             # compared with a resumed run's as what it is on this device
        args.dtype = resolve_dtype(device)
    if args.causal:                      # the GPT twin: no time input, its own decay (lab/README.md)
        values['use_time'], values['decay_frac'] = False, GPT_DECAY_FRAC
    for k, v in values.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise CliError(f'--n-embd {args.n_embd} must split into --n-head {args.n_head} heads of even size')

def main(argv=None):
    for stream in (sys.stdout, sys.stderr):   # a terminal that cannot draw the mask glyph gets an escape
        getattr(stream, 'reconfigure', lambda **kw: None)(errors='backslashreplace')
    args = build_parser().parse_args(argv)
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    args.causal, args.num_samples = bool(args.causal), args.num_samples or 1
    try:
        refuse_unused_flags(args)
        if args.overwrite and args.resume:
            raise CliError('--overwrite starts a --train over: it does not go with --resume')
        args.out_dir = args.out_dir or ('out-gpt' if args.train and args.causal else 'out')
        if args.train:
            train(args)
            return 0
        return run_eval(args) if args.eval else run_generation(args)
    except CliError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    except OSError as e:          # an out-dir that cannot be made or written, a full disk
        print(f'error: {e.strerror or e}: {e.filename or args.out_dir}', file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and 'alloc' not in str(e).lower():
            if int(os.environ.get('WORLD_SIZE', 1)) > 1:     # torchrun: a peer's failure breaks this rank's collective
                print(f'error: rank {os.environ.get("RANK")} stops because another rank failed (its error is above): '
                      f'{str(e).strip().splitlines()[0][:200]}', file=sys.stderr)
                return 1
            raise
        print('error: out of memory: ask for less (--num-samples, --length, --batch-size)', file=sys.stderr)
        return 1

if __name__ == '__main__' and not NOTEBOOK:   # a notebook's kernel has arguments of its own
    sys.exit(main())
