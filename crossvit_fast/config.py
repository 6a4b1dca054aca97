"""Constants shared by the models, the reference math and the kernels' callers."""

LN_EPS = 1e-6
"""eps of every LayerNorm in CrossViT (timm's ``partial(nn.LayerNorm, eps=1e-6)``)."""

ENV_BACKEND = "CROSSVIT_FAST_BACKEND"
"""Environment variable that sets the default backend ("reference", "triton" or "auto")."""
