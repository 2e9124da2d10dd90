"""Composition: settings turned into the running gateway.

`server` builds the aiohttp application that hosts every listener and serves it (the
edge process); `specs` turns settings into what each layer takes, `resources` opens and
closes what the app holds, `state` names it. The edge's children (`worker_main`,
`translator_main`) are modules of this package too, and take only what they use:
`tables` (the tables loaded), `files` (the data dir's files), `wire` (their frames). This
module imports nothing: a translator that imported the application's wiring with it
took ~1.1 s to start on a quiet machine, over 10 s on a loaded one.
"""
