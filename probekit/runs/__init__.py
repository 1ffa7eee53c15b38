"""Runs on disk: run files (:mod:`probekit.runs.config`), comparisons (:mod:`probekit.runs.compare`),
the run directory and its record (:mod:`probekit.runs.rundir`), cached parts (:mod:`probekit.runs.parts`)
and engines beside the local one (:mod:`probekit.runs.engines`).
"""
