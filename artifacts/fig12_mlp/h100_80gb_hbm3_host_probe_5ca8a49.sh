python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; python3 - <<'PY'
import os,time,torch,cProfile,pstats,io
from longexposure.ops.neuron_block_mlp import neuron_block_mlp, neuron_major
d,f,t=2048,8192,2048
g=lambda *s: torch.randn(*s,device='cuda',dtype=torch.float16)*0.02
x=g(t,d); w1=g(f,d); b1=g(f); w2=neuron_major(g(d,f)); b2=g(d)
for dens in (1.0,0.1):
  ids=torch.arange(int(128*dens),dtype=torch.int32,device='cuda')
  for mode,env in (('defaults',{}),('pointer',{'LONGEXPOSURE_TMA':'0','LONGEXPOSURE_PERSISTENT':'0'}),('tma-per-tile',{'LONGEXPOSURE_TMA':'sdd,dsd','LONGEXPOSURE_PERSISTENT':'0'}),('pointer-persistent-sdd',{'LONGEXPOSURE_TMA':'0','LONGEXPOSURE_PERSISTENT':'1'})):
    for k in ('LONGEXPOSURE_TMA','LONGEXPOSURE_PERSISTENT'): os.environ.pop(k,None)
    os.environ.update(env)
    fn=lambda: neuron_block_mlp(x,ids,w1,b1,w2,b2,block_size=64)
    for _ in range(5): fn()
    torch.cuda.synchronize(); s=time.perf_counter()
    for _ in range(50): fn()
    host=(time.perf_counter()-s)/50*1e6; torch.cuda.synchronize(); tot=(time.perf_counter()-s)/50*1e6
    print(dens,mode,'host_us %.0f'%host,'wall_us %.0f'%tot, flush=True)
    if dens==0.1 and mode in ('defaults','pointer'):
      pr=cProfile.Profile(); pr.enable()
      for _ in range(50): fn()
      pr.disable(); torch.cuda.synchronize(); o=io.StringIO(); pstats.Stats(pr,stream=o).sort_stats('tottime').print_stats(8); print('\n'.join(l[:150] for l in o.getvalue().splitlines()[6:20]))
PY
