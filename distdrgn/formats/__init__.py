"""Reading and writing the files of cryo-EM practice.

- :mod:`~distdrgn.formats.mrc`: lazy MRC image stacks, volume and stack writers.
- :mod:`~distdrgn.formats.star`: RELION ``.star`` tables (3.0, 3.1/4, 5).
- :mod:`~distdrgn.formats.cs`: cryoSPARC ``.cs`` structured arrays.
- :mod:`~distdrgn.formats.poses`: Euler / axis-angle conventions, pose parsing, ``poses.pkl``.
- :mod:`~distdrgn.formats.ctf_params`: CTF parameter parsing, ``ctf.pkl``.
- :mod:`~distdrgn.formats.particles`: resolving a particle input (stack, list, .star, .cs).

Submodules are imported explicitly (``from distdrgn.formats.mrc import open_mrc``) so that
importing one does not pull in pandas/starfile when they are not needed.
"""
