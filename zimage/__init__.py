"""Z-Image-Turbo server: a memory-aware loader, a one-job-at-a-time generation service, a web app.

Importing this package does no heavy work: no torch, no model, no GPU probe. Entry points build
things through factories (:func:`zimage.settings.settings_from_args`,
:class:`zimage.service.GenerationService`, :func:`zimage.web.build_app`).
"""

__version__ = "0.1.0"
