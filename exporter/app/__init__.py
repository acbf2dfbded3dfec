"""The app layer: the wiring. It owns the configuration (config: flags, environment, file),
the command line (cli), start-up checks (doctor), the poll loop (poller) and the service
lifecycle (service: task group, signals). It is the only layer that may import every other
one; nothing outside it imports it."""
