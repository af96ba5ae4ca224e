import sys; sys.path.insert(0,'tests')
import torch, evoplug, copy
from torch import nn
import evoplug.runtime.block as rb
from test_channels_first import _levit_pair
cap = {}
orig_run = rb.__dict__.get('EvoBlock', None)
torch.manual_seed(0)
tokens, maps = _levit_pair()
class Only(nn.Module):
    def __init__(s, blocks): super().__init__(); s.blocks = blocks
    def forward(s, x): return s.blocks(x)
import os; MODE=os.environ["MODE"]
import test_channels_first as TC
T = TC._pair(False)[1]
x = torch.randn(4, 128, 14, 14) if MODE=="maps" else T.embed(torch.randn(4,3,32,32)).detach()
for b_ in maps.stages[0].blocks: b_.attn.attention_biases.data.zero_() if os.environ.get("NOBIAS") else None
fb = evoplug.convert(Only(copy.deepcopy(maps.stages[0].blocks) if MODE=="maps" else T.blocks), keep_ratio=0.5, example_input=x[:2]).double().eval()
blk = fb.blocks[1]
cls = type(blk)
orig = cls._run
def _run(self, sub, extras, program, state, sel, g, since, x0, rep0):
    def wrapped(slf, *a):
        cap['args'] = a; cap['program'] = program
        return program(slf, *a)
    return orig(self, sub, extras, wrapped, state, sel, g, since, x0, rep0)
cls._run = _run
fb(x.double())
cls._run = orig
prog = cap['program']; args = cap['args']
print([type(a).__name__ if not isinstance(a, torch.Tensor) else tuple(a.shape) for a in args])
sub, pos, full = args[0].detach(), args[-2], args[-1].detach()
def f(sub, full):
    if os.environ.get('DENSE'):
        return prog(blk, full, *args[1:-2], None, None)[0]
    out = prog(blk, sub, *args[1:-2], pos, full)
    return out[0]
s1 = sub.clone().requires_grad_(); f1 = full.clone().requires_grad_()
o = f(s1, f1); w = torch.randn_like(o); (o * w).sum().backward()
ds, dfu = torch.randn_like(sub), torch.randn_like(full)
eps = 1e-6
with torch.no_grad():
    fd_s = ((f(sub + eps*ds, full) * w).sum() - (f(sub - eps*ds, full) * w).sum()) / (2*eps)
    fd_f = ((f(sub, full + eps*dfu) * w).sum() - (f(sub, full - eps*dfu) * w).sum()) / (2*eps)
print("sub: autograd", (s1.grad*ds).sum().item() if s1.grad is not None else None, "fd", fd_s.item())
print('full: autograd', (f1.grad*dfu).sum().item(), 'fd', fd_f.item())
