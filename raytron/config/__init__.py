"""raytron.config: the job config (typed, strict, frozen) that every layer may read.

`spec` holds JobSpec and its sections, `strict_yaml` the YAML reader they are loaded with. It sits at the
package root, below launcher/ and parallelism/, so that both import it and neither imports the other
upward; it imports nothing from raytron's subpackages.
"""
