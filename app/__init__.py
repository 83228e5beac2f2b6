"""The Gradio workbench (UI layer). It imports ``e3rl_core``; ``e3rl_core`` never imports it."""
