"""gpu_check.py's modules: the figures' summary (report) and the real-trainer part (trainer)."""
