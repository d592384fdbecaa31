"""Models: the block library, the gin-declared network builder and the plan."""
