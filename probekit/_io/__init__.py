"""Files: atomic writes (:mod:`probekit._io.atomic`) and content identities (:mod:`probekit._io.fileid`)."""
