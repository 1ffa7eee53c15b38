"""What a person reads, drawn from results only: figures (:mod:`probekit.views.plots`), group
contrasts (:mod:`probekit.views.contrasts`) and the HTML report (:mod:`probekit.views.report`).
"""
