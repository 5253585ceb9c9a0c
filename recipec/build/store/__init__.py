"""The stage cache's remote side: where a cache lives (`location`), its copy at a URL (`remote`), and the
lease that lets one worker build a key while the others wait for its entry (`lease`).

`recipec.build.cache.StageCache` is the one user of this package; it keeps a local directory either way (the
cache itself, or the URL's read-through mirror), so the stage runner never sees the difference.
"""
