"""The CPU demo (the README's first command): ``python -m director_jax.demo`` (see ``__main__``)."""
