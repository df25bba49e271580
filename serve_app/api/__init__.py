"""The HTTP side: routes, validation, input images, wire models. Never imports torch."""
