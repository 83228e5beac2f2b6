"""Hugging Face Space entry point (``app_file`` in the README front matter): the workbench in Space
mode — shipped and trained checkpoints only, bounded training, offline, CPU defaults."""
import os

os.environ.setdefault("E3RL_SPACE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Space mode's models are local directories: nothing is fetched (set before the hub client is imported).
os.environ["HF_HUB_OFFLINE"] = "1"

from app.main import launch  # noqa: E402

# A Space routes traffic to 0.0.0.0:7860 inside its container; locally `e3rl app` binds 127.0.0.1.
launch(host="0.0.0.0", port=int(os.environ.get("PORT", "7860")), space=True)
