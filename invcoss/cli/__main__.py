"""``python -m invcoss.cli``: the same commands as ``invcoss-cli``, and what ``torchrun -m invcoss.cli`` runs.

Example:
    ``torchrun --nproc-per-node 2 -m invcoss.cli stats --model m.safetensors --data cache --out s.safetensors``
"""

from invcoss.cli import main

if __name__ == "__main__":
    main(prog_name="invcoss-cli")
