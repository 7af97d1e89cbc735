"""autoexplain: explain every neuron of a language model, OpenAI-2023 style, as a pipeline.

Follow one neuron through the modules in this order:
corpus -> subject -> selection -> record -> (explain -> simulate -> score)
"""

__version__ = "0.1.0"
