"""The browser pages: the playground (``assist serve`` at ``/``) and the eval results viewer
(``assist eval view``), as static files shipped with the package.

Plain HTML, CSS and JavaScript, no build step and nothing fetched from the network: the
pages work offline and on a machine that can reach nothing but the server. ``trace.js``
draws a strategy's trace and is shared by both pages. The front doors serve the files by
their fixed names (:data:`FILES`): no client string ever becomes a path.
"""

from assist.web._static import FILES, PAGES, read

__all__ = ["FILES", "PAGES", "read"]
