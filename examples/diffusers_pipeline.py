"""sdekit's solvers inside an unchanged diffusers pipeline (SdekitScheduler).

A tiny random UNet2DModel stands in for a real one (nothing is downloaded): with a pretrained
pipeline, e.g. ``DDPMPipeline.from_pretrained("google/ddpm-cat-256")``, the scheduler lines are
the same.

Run: python examples/diffusers_pipeline.py
"""
import time

import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

import sdekit
from sdekit.interop import SdekitScheduler

torch.manual_seed(0)
unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                   layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
calls = [0]
unet.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
pipe = DDPMPipeline(unet, DDIMScheduler(clip_sample=False))
pipe.set_progress_bar_config(disable=True)


def run(steps: int) -> torch.Tensor:
    calls[0] = 0
    return pipe(batch_size=4, generator=torch.Generator().manual_seed(0),
                num_inference_steps=steps, output_type="pt").images


# 1. sdekit's DDIM on diffusers' own ("leading") timesteps reproduces DDIMScheduler
reference = run(10)
ddim_config = pipe.scheduler.config
pipe.scheduler = SdekitScheduler.from_config(ddim_config, solver="ddim", grid="leading")
diff = (run(10) - reference).abs().max().item()
print(f"ddim via SdekitScheduler vs DDIMScheduler: max |difference| = {diff:.1e}")

# 2. any fixed-grid solver, on its own grid; timesteps has one entry per network call
for solver, steps in [("dpmpp_3m", 10), ("unipc_bh2", 10), ("dpm_solver_3", 10),
                      ("heun", 6), ("dpmpp_2m_sde", 10)]:
    pipe.scheduler = SdekitScheduler.from_config(ddim_config, solver=solver)
    t0 = time.perf_counter()
    images = run(steps)
    print(f"{solver:13s} num_inference_steps={steps:2d}  NFE={calls[0]:2d} "
          f"(len(timesteps)={len(pipe.scheduler.timesteps)}, order={pipe.scheduler.order})  "
          f"{time.perf_counter() - t0:.2f} s")

# 3. the same solve through sdekit.sample, on the scheduler's grid (sched.times)
sched = pipe.scheduler = SdekitScheduler.from_config(ddim_config, solver="heun")
images = run(6)
pipeline_nfe = calls[0]
x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
sol = sdekit.sample(sched.sde, lambda x, t: unet(x, t).sample, x_T, solver="heun",
                    grid=sched.times, denoise=True)
diff = (images - (sol.x / 2 + 0.5).clamp(0, 1)).abs().max().item()
print(f"heun in the pipeline vs sdekit.sample: NFE {pipeline_nfe} vs {sol.nfe}, "
      f"max |difference| = {diff:.1e}")
