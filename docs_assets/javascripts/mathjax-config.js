// MathJax 3 settings for the notebook pages. nbconvert leaves TeX between $...$ and $$...$$ in
// the page text, and MathJax 3 reads only \(...\) unless inlineMath is set. This file must load
// before tex-chtml-full.js (mkdocs.yml lists them in that order). MathJax skips <pre> and
// <code>, so code cells and printed outputs with a $ in them stay as they are.
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  chtml: {
    // The fonts sit next to tex-chtml-full.js; the URL is resolved against this script's own URL,
    // so pages in any folder find them.
    fontURL: new URL("../mathjax/output/chtml/fonts/woff-v2", document.currentScript.src).href,
  },
};
