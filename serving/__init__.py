"""The same app on Ray Serve: engine replicas as one deployment, the HTTP + Gradio front end as the ingress.

Optional: only `serving.ray_app` imports `ray` (`pip install -r requirements-ray.txt`); nothing else in the repo
imports this package. See docs/ray.md.
"""
